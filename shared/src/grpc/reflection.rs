//! `grpc.reflection.v1` and `v1alpha` as the reflection protocol describes them.
//!
//! We replace tonic-reflection's server (keeping its generated `pb` types and server traits)
//! because it ends the whole stream with NOT_FOUND when a name is unknown. The protocol
//! (`grpc/reflection/v1/reflection.proto`) answers with an `error_response` inside the stream
//! and goes on serving it; grpcio's reflection descriptor database turns that answer into a
//! KeyError, and tonic-reflection's ending into an RpcError. tonic-reflection also sends a
//! file without the files it imports and knows no extensions. As grpc-go does, we send each
//! file with the imports not yet sent on the stream, find every name a file declares, and
//! answer the extension requests.
//!
//! One implementation serves both versions: v1alpha's messages are v1's under another
//! package, field for field, so v1alpha requests and responses are re-read as v1 ones.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use prost::Message;
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorProto,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{
    ErrorResponse, ExtensionNumberResponse, ExtensionRequest, FileDescriptorResponse,
    ListServiceResponse, ServerReflectionRequest, ServerReflectionResponse, ServiceResponse,
};
use tonic_reflection::pb::{v1, v1alpha};

/// Largest reflection request accepted (a request names one file, symbol or type; larger
/// ones get OUT_OF_RANGE from tonic and end the stream).
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// The v1 and v1alpha reflection services over one index.
pub type Servers = (
    v1::server_reflection_server::ServerReflectionServer<Reflection>,
    v1alpha::server_reflection_server::ServerReflectionServer<Reflection>,
);

/// Why the descriptor sets cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot decode a file descriptor set: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("a file descriptor has no name")]
    UnnamedFile,
    #[error("service {0} is to be listed, but no registered file declares it")]
    UndeclaredService(String),
}

/// Both reflection services, listing `services` and describing every file of the encoded
/// `FileDescriptorSet`s in `descriptor_sets`.
pub fn servers(services: &[&str], descriptor_sets: &[&[u8]]) -> Result<Servers, Error> {
    let reflection = Reflection::new(services, descriptor_sets)?;
    Ok((
        v1::server_reflection_server::ServerReflectionServer::new(reflection.clone())
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        v1alpha::server_reflection_server::ServerReflectionServer::new(reflection)
            .max_decoding_message_size(MAX_REQUEST_BYTES),
    ))
}

/// The reflection service (both versions implement their trait on it).
#[derive(Clone, Debug)]
pub struct Reflection {
    index: Arc<Index>,
}

impl Reflection {
    /// Indexes the files of the encoded `FileDescriptorSet`s (of two files with one name,
    /// the first wins) and lists `services`, each of which one of the files must declare.
    pub fn new(services: &[&str], descriptor_sets: &[&[u8]]) -> Result<Self, Error> {
        let mut index = Index::default();
        for set in descriptor_sets {
            for file in EncodedFileSet::decode(*set)?.file {
                index.add(file)?;
            }
        }
        for service in services {
            if !index.symbols.contains_key(*service) {
                return Err(Error::UndeclaredService(service.to_string()));
            }
            index.services.push(service.to_string());
        }
        Ok(Reflection {
            index: Arc::new(index),
        })
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl v1::server_reflection_server::ServerReflection for Reflection {
    type ServerReflectionInfoStream = ResponseStream<ServerReflectionResponse>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        let responses = respond(Arc::clone(&self.index), request.into_inner());
        Ok(Response::new(Box::pin(responses)))
    }
}

#[tonic::async_trait]
impl v1alpha::server_reflection_server::ServerReflection for Reflection {
    type ServerReflectionInfoStream = ResponseStream<v1alpha::ServerReflectionResponse>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<v1alpha::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        let requests = request.into_inner().map(|request| transcode(&request?));
        let responses =
            respond(Arc::clone(&self.index), requests).map(|response| transcode(&response?));
        Ok(Response::new(Box::pin(responses)))
    }
}

/// Answers each request of one stream in turn. Nothing of ours queues: a request is read
/// when tonic asks for the next response, which hyper does again only once the previous
/// answer fits the client's HTTP/2 window, so a client that stops reading stops being read. The stream ends with
/// the client's requests, or with INVALID_ARGUMENT on a request that asks nothing (as
/// grpc-go does).
fn respond(
    index: Arc<Index>,
    requests: impl Stream<Item = Result<ServerReflectionRequest, Status>> + Send + 'static,
) -> impl Stream<Item = Result<ServerReflectionResponse, Status>> + Send + 'static {
    // Files already sent on this stream: at most every file of the index.
    let mut sent = HashSet::new();
    requests.map(move |request| {
        let request = request?;
        let Some(message_request) = &request.message_request else {
            return Err(Status::invalid_argument("the request asks nothing"));
        };
        let message_response = index.answer(message_request, &mut sent);
        Ok(ServerReflectionResponse {
            valid_host: request.host.clone(),
            original_request: Some(request),
            message_response: Some(message_response),
        })
    })
}

/// Re-reads a reflection message as its twin in the other version (the same fields under
/// the same numbers), so it cannot fail on a message the other side could encode.
fn transcode<A: Message, B: Message + Default>(message: &A) -> Result<B, Status> {
    B::decode(message.encode_to_vec().as_slice())
        .map_err(|error| Status::internal(format!("reflection message: {error}")))
}

/// What reflection can describe, built once at start-up.
#[derive(Debug, Default)]
struct Index {
    /// Service names listed by `list_services`.
    services: Vec<String>,
    files: HashMap<String, File>,
    /// Full name (no leading dot) of each thing a file declares, to that file's name.
    symbols: HashMap<String, String>,
    /// Extended message, to extension number, to the name of the file extending it.
    extensions: HashMap<String, BTreeMap<i32, String>>,
}

#[derive(Debug)]
struct File {
    /// The `FileDescriptorProto` as it came, so options prost does not know are kept.
    encoded: Vec<u8>,
    imports: Vec<String>,
}

impl Index {
    fn add(&mut self, encoded: Vec<u8>) -> Result<(), Error> {
        let file = FileDescriptorProto::decode(encoded.as_slice())?;
        let name = file.name().to_string();
        if name.is_empty() {
            return Err(Error::UnnamedFile);
        }
        if self.files.contains_key(&name) {
            return Ok(());
        }
        let declared = Declarations::of(&file);
        for symbol in declared.symbols {
            self.symbols.entry(symbol).or_insert_with(|| name.clone());
        }
        for (extended, number) in declared.extensions {
            let numbers = self.extensions.entry(extended).or_default();
            numbers.entry(number).or_insert_with(|| name.clone());
        }
        let imports = file.dependency;
        self.files.insert(name, File { encoded, imports });
        Ok(())
    }

    /// The answer to one request; `sent` holds the files already sent on its stream.
    fn answer(&self, request: &MessageRequest, sent: &mut HashSet<String>) -> MessageResponse {
        let answer = match request {
            MessageRequest::FileByFilename(file) => self.file_with_imports(file, sent),
            MessageRequest::FileContainingSymbol(symbol) => match self.symbols.get(symbol) {
                Some(file) => self.file_with_imports(file, sent),
                None => Err(format!("symbol {symbol:?} not found")),
            },
            MessageRequest::FileContainingExtension(ExtensionRequest {
                containing_type,
                extension_number,
            }) => match self
                .extensions
                .get(containing_type)
                .and_then(|numbers| numbers.get(extension_number))
            {
                Some(file) => self.file_with_imports(file, sent),
                None => Err(format!(
                    "extension {extension_number} of {containing_type:?} not found"
                )),
            },
            MessageRequest::AllExtensionNumbersOfType(message) => {
                self.extension_numbers(message).map(|extension_number| {
                    MessageResponse::AllExtensionNumbersResponse(ExtensionNumberResponse {
                        base_type_name: message.clone(),
                        extension_number,
                    })
                })
            }
            MessageRequest::ListServices(_) => {
                Ok(MessageResponse::ListServicesResponse(ListServiceResponse {
                    service: (self.services.iter())
                        .map(|name| ServiceResponse { name: name.clone() })
                        .collect(),
                }))
            }
        };
        answer.unwrap_or_else(|error_message| {
            MessageResponse::ErrorResponse(ErrorResponse {
                error_code: tonic::Code::NotFound as i32,
                error_message,
            })
        })
    }

    /// The file, then breadth-first the files it imports that were not sent on this stream
    /// before (reflection.proto allows leaving those out). An import we do not have is left
    /// out; a client asking for it by name hears NOT_FOUND.
    fn file_with_imports(
        &self,
        name: &str,
        sent: &mut HashSet<String>,
    ) -> Result<MessageResponse, String> {
        if !self.files.contains_key(name) {
            return Err(format!("file {name:?} not found"));
        }
        sent.insert(name.to_string());
        let mut encoded = Vec::new();
        let mut queue = VecDeque::from([name]);
        while let Some(name) = queue.pop_front() {
            let Some(file) = self.files.get(name) else {
                continue;
            };
            encoded.push(file.encoded.clone());
            for import in &file.imports {
                if sent.insert(import.clone()) {
                    queue.push_back(import);
                }
            }
        }
        Ok(MessageResponse::FileDescriptorResponse(
            FileDescriptorResponse {
                file_descriptor_proto: encoded,
            },
        ))
    }

    /// Extension numbers of a message, in order; none for a known name nothing extends.
    fn extension_numbers(&self, message: &str) -> Result<Vec<i32>, String> {
        match self.extensions.get(message) {
            Some(numbers) => Ok(numbers.keys().copied().collect()),
            None if self.symbols.contains_key(message) => Ok(Vec::new()),
            None => Err(format!("type {message:?} not found")),
        }
    }
}

/// A `FileDescriptorSet` whose files stay encoded (same field number as `file`), so each is
/// served byte for byte.
#[derive(Clone, PartialEq, Message)]
struct EncodedFileSet {
    #[prost(bytes = "vec", repeated, tag = "1")]
    file: Vec<Vec<u8>>,
}

/// The full names a file declares (what grpc-go's resolver finds: messages, fields, oneofs,
/// enums, enum values, extensions, services and methods), and its extensions as
/// (extended message, number).
#[derive(Default)]
struct Declarations {
    symbols: Vec<String>,
    extensions: Vec<(String, i32)>,
}

impl Declarations {
    fn of(file: &FileDescriptorProto) -> Self {
        let mut declared = Declarations::default();
        let package = file.package();
        for message in &file.message_type {
            declared.message(package, message);
        }
        for enumeration in &file.enum_type {
            declared.enumeration(package, enumeration);
        }
        for extension in &file.extension {
            declared.extension(package, extension);
        }
        for service in &file.service {
            let service_name = qualified(package, service.name());
            for method in &service.method {
                declared
                    .symbols
                    .push(qualified(&service_name, method.name()));
            }
            declared.symbols.push(service_name);
        }
        declared
    }

    fn message(&mut self, scope: &str, message: &DescriptorProto) {
        let name = qualified(scope, message.name());
        for field in &message.field {
            self.symbols.push(qualified(&name, field.name()));
        }
        for oneof in &message.oneof_decl {
            self.symbols.push(qualified(&name, oneof.name()));
        }
        for nested in &message.nested_type {
            self.message(&name, nested);
        }
        for enumeration in &message.enum_type {
            self.enumeration(&name, enumeration);
        }
        for extension in &message.extension {
            self.extension(&name, extension);
        }
        self.symbols.push(name);
    }

    fn enumeration(&mut self, scope: &str, enumeration: &EnumDescriptorProto) {
        self.symbols.push(qualified(scope, enumeration.name()));
        // Enum values are siblings of their enum in protobuf's scoping (`pkg.VALUE`).
        for value in &enumeration.value {
            self.symbols.push(qualified(scope, value.name()));
        }
    }

    fn extension(&mut self, scope: &str, extension: &FieldDescriptorProto) {
        self.symbols.push(qualified(scope, extension.name()));
        // Descriptor sets name types fully qualified, with a leading dot.
        let extended = extension.extendee().trim_start_matches('.').to_string();
        self.extensions.push((extended, extension.number()));
    }
}

fn qualified(scope: &str, name: &str) -> String {
    if scope.is_empty() {
        name.to_string()
    } else {
        format!("{scope}.{name}")
    }
}

#[cfg(test)]
mod tests;

//! Generated code for the wire contract in `proto/`.

/// Encoded `FileDescriptorSet` of every proto file (and its imports), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

pub mod listen {
    pub mod v1 {
        #![allow(clippy::all)]
        tonic::include_proto!("listen.v1");

        /// Full name of the public service, as used by health and reflection.
        pub const SERVICE_NAME: &str = "listen.v1.Listen";
        /// Health service name that reports the state of the link to pusher.
        pub const LINK_HEALTH_NAME: &str = "listen.v1.PusherLink";
    }
}

pub mod pusher {
    pub mod v1 {
        #![allow(clippy::all)]
        tonic::include_proto!("pusher.v1");

        /// Full name of the service, as used by health and reflection.
        pub const SERVICE_NAME: &str = "pusher.v1.Pusher";
    }
}

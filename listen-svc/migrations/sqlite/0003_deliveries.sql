ALTER TABLE conversations ADD COLUMN deliveries BLOB; -- protobuf: repeated listen.v1.WebhookDelivery (field 1)

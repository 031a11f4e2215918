ALTER TABLE conversations ADD COLUMN deliveries BYTEA; -- protobuf: repeated listen.v1.WebhookDelivery (field 1)

-- The last Kafka result message sent for the task (`<attempt>/<turn>/<status>`), written
-- once the broker has it; the same schema as migrations/sqlite.
ALTER TABLE tasks ADD COLUMN result_sent TEXT NULL;

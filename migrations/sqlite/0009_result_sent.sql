-- The last Kafka result message sent for the task (`<attempt>/<turn>/<status>`), written
-- once the broker has it: a step that runs again for the same end sends nothing more.
ALTER TABLE tasks ADD COLUMN result_sent TEXT;

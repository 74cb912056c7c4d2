-- A task as a conversation and a race: its follow-up turns and its best-of-N candidates
-- (JSON arrays of core's TurnRecord and CandidateRecord, NULL until there are any), and
-- the candidate whose results are the task's; the same schema as migrations/sqlite.
ALTER TABLE tasks
    ADD COLUMN turns MEDIUMTEXT NULL,
    ADD COLUMN candidates MEDIUMTEXT NULL,
    ADD COLUMN selected BIGINT NULL;

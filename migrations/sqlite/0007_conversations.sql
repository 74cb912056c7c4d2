-- A task as a conversation and a race: its follow-up turns and its best-of-N candidates
-- (JSON arrays of core's TurnRecord and CandidateRecord, NULL until there are any), and
-- the candidate whose results are the task's.
ALTER TABLE tasks ADD COLUMN turns TEXT;
ALTER TABLE tasks ADD COLUMN candidates TEXT;
ALTER TABLE tasks ADD COLUMN selected INTEGER;

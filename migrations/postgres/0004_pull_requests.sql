-- Why a task's pull (merge) request could not be opened, beside its `pr_url`: a COMPLETED
-- task whose diff is good but whose push or forge call was refused.
ALTER TABLE tasks ADD COLUMN pr_error TEXT;

//! patchflow-activities

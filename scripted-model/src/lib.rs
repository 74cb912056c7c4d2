//! patchflow-scripted-model

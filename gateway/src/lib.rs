//! patchflow-gateway

mod api;
mod durability;
mod e2e;
mod failures;

mod api;
mod backends;
mod durability;
mod e2e;
mod failures;

//! sagad: a saga coordinator. Crate map: [`store`], the ledger (the only module that names sled).

pub mod store;

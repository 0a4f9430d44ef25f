"""narthex.features: Online feature store and transaction event ingestion."""

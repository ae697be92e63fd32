"""The weight atlas: projection math, Parquet schema, and the streaming, resumable build job."""

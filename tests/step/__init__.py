"""The flat step engine: buckets, segment tables, ``bucket_step``."""

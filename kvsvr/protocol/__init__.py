"""Sans-IO protocol core: no trio, no lmdb, no clock. Messages in, messages and effects out."""

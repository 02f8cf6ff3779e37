"""Backup and restore: `kvsvr backup`, `kvsvr verify-backup`, `kvsvr restore`.

- `format`: the manifest and the data files (pure);
- `merge`: which version of a key a backup keeps (pure);
- `messages`: the requests between the backup client and a node;
- `take`: taking a backup from a serving cluster;
- `verify`: checking a backup on disk;
- `restore`: building a new cluster from a backup.
"""

from kvsvr.backup.format import BadBackup, Manifest, Record

__all__ = ["BadBackup", "Manifest", "Record"]

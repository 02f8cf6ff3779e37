"""Example applications on kvsvr's public client API: a WeChat-style chat
(`kvsvr.apps.chat`) and WeChat Moments (`kvsvr.apps.moments`).

Both are plain libraries over `kvsvr.Client`; their tables must be declared in
the cluster config. `tables_toml()` returns the `[[tables]]` entries to paste
into a config, and `app_tables()` the same as `TableConfig`s:

    config = kvsvr.config.local_cluster(3, 7100, tables=(TableConfig("default"), *app_tables()))

See `kvsvr/apps/README.md` for the data model.
"""

from __future__ import annotations

from kvsvr.apps._tables import CHAT_TABLES, MOMENTS_TABLES, app_tables, tables_toml

__all__ = ["CHAT_TABLES", "MOMENTS_TABLES", "app_tables", "tables_toml"]

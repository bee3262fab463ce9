"""Bundled datasets built from installed packages: Wikipedia summaries (pretraining corpus),
the World Factbook with closed-book questions (niche corpus), reasoning-gym task sets."""
from selftaught.data.schema import DOC_SCHEMA, BuildStats, documents_table, package_data_dir

__all__ = ["DOC_SCHEMA", "BuildStats", "documents_table", "package_data_dir"]

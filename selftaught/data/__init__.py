"""Bundled datasets built from installed packages (nothing is downloaded):

- :mod:`~selftaught.data.wiki` -- Wikipedia vital-article summaries, the pretraining corpus;
- :mod:`~selftaught.data.factbook` -- World Factbook documents and closed-book questions;
- :mod:`~selftaught.data.reasoning` -- reasoning-gym task sets with their verifiers;
- :mod:`~selftaught.data.prepare` -- ``prepare(DataConfig, out_dir)``, resumable, to Parquet; also
  your own corpus (``DataConfig.corpus``: a Parquet file, directory or URI) in the same schema.

Only the schema is imported here; the builders are imported where they are used.
"""
from selftaught.data.schema import (DOC_SCHEMA, QUESTION_SCHEMA, TASK_SCHEMA, USER_COLUMNS, BuildStats,
                                    documents_table, make_doc, validate_document)

__all__ = ["DOC_SCHEMA", "QUESTION_SCHEMA", "TASK_SCHEMA", "USER_COLUMNS", "BuildStats", "documents_table",
           "make_doc", "validate_document"]

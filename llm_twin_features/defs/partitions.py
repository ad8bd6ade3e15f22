"""One partition per data type: a backfill of every partition rebuilds the feature store."""

import dagster as dg

from llm_twin_features.settings import DATA_TYPES

data_type_partitions = dg.StaticPartitionsDefinition(list(DATA_TYPES))

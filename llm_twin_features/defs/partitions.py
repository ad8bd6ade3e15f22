"""One partition per data type: a backfill of every partition rebuilds the feature store."""

import dagster as dg

from llm_twin_features.domain.data_types import data_types

data_type_partitions = dg.StaticPartitionsDefinition(list(data_types()))

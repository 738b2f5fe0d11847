"""Files: model checkpoints (``loading``, ``hf``), data shards (``data``) and result files (``resultfile``)."""

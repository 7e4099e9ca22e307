"""Running a model: the continuous-batching engine, sampling, MTP speculative decoding, chat templates, incremental detokenization, constrained decoding and the local model store."""

"""Quality evaluation of KV caches: streaming perplexity and greedy agreement (``python -m pagedkv.eval``)."""

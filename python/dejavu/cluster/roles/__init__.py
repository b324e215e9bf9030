"""The roles a worker process hosts (cluster/worker.py): each adds its state and its entries of the
control-message handler table.

  stage    (stage.py)    one stage x one TP shard of a pipeline: model, KV cache, step; every worker
  prompt   (prompt.py)   disaggregation's prompt side: prefill, each layer's KV streamed out
  token    (token.py)    disaggregation's token side: receives prompt KV, admits it, then decodes
  replica  (replica.py)  --replicate: sends this worker's KV to each of its holders, holds others', restores
"""

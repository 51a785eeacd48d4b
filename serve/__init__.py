"""The protected query service: the model behind the Open Inference Protocol (KServe v2 REST).

Layers of the gateway, in the order a request meets them (serve/PROTOCOL.md is the spec):
authentication (API keys stored as salted hashes, mutual TLS with the service's own CA),
replay refusal, token-bucket rate limits with exponential backoff, a body-size limit and
strict tensor checks, per-key query budgets, PRADA extraction detection, the output policy
(label only, rounded top-1, noisy probabilities that keep the argmax) and a DAWN watermark.
Every count is committed to SQLite before the answer leaves.

Imports roadshield_base and edge_runtime only; never torch, never the cloud tier.
"""

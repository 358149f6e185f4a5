"""Policy endpoint: vLLM inside Ray Serve, OpenAI-compatible, with versioned live weight updates.

Decision (issue 4, item 0): a lean Serve deployment of our own around vLLM's
async engine, not ``ray.serve.llm``. Ray Serve LLM does start the vLLM CPU
build here (MACHINE_NOTES.md), but what RL needs is outside its OpenAI app:
every response must carry the policy version and the sampled token ids, a
weight swap must drain or mark in-flight requests and clear the prefix cache,
and a replica must pull the current weights in its constructor before Serve
routes traffic to it. Doing that in Serve LLM means subclassing its server and
ingress internals; it also runs two deployments (ingress + engine), an extra
hop and an extra replica's CPU on a 2-core machine. Our deployment is one
class (``server.PolicyServer``) with a FastAPI ingress (``app.py``), the same
vLLM ``AsyncLLM`` engine (batching, prefix caching) and Serve's autoscaling.

Modules: ``tiny_model`` (local model builder), ``weights`` (safetensors
packing, WeightStore), ``engine`` (vLLM wrapper), ``worker_ext`` (in-place
reload inside vLLM's worker, tied-head repair), ``server`` (one replica),
``openai_api`` (request/response shapes), ``router`` (session affinity),
``app`` (composition root), ``client`` (PolicyClient), ``gpu`` (NCCL weight
sync on CUDA), ``cli`` (``proxmo serve``).
"""

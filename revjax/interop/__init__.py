"""Weight conversion between revjax models and their twins in other frameworks.

``revjax.interop.torch``: ``from_torch(jax_model, state_dict)`` and ``to_torch(jax_model)``
for ``revtorch`` state dicts (torch is imported only when a conversion runs).
"""

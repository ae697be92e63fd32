"""Circuits: edge attribution patching (EAP, EAP-IG; Hanna et al. 2024) on live Hugging Face models.

graph.py names the nodes and edges of a model's computational graph; model_parts.py is the one place
that knows where each family keeps the modules playing each role (and un-groups grouped-query
attention); scores.py computes EAP / EAP-IG edge scores with gradients; patching.py runs the model with
a chosen set of edges cut (patched to the corrupted run) and measures a circuit's faithfulness.
"""

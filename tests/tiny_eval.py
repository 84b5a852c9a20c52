"""The set-up shared by the tests that evaluate for real: held-out renders and a tiny exported
identity embedder (the metric), written under one folder."""

from __future__ import annotations

from pathlib import Path


def heldout_and_embedder(root: Path, identities: int, seed: int, first_identity: int, folder: str = "heldout") -> Path:
    """``root/folder``: ``identities`` held-out identities x 2 views at 32 px; ``root/embedder.pt``: a
    random 8-dim embedder (seeded) in the file format the embedder stage exports. Returns root/folder."""
    import torch

    from icp.data.shards.write import synth
    from icp.models.embedder import IdentityEmbedderNet, export

    synth(root / folder, identities, 2, 32, seed=seed, shard_size=2, first_identity=first_identity, progress=False)
    torch.manual_seed(0)
    export(IdentityEmbedderNet(dim=8, width=4, depth=2, input_size=16).eval(), root / "embedder.pt")
    return root / folder

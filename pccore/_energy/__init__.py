"""Energy variants and their parts: what predictive coding minimises.

- `_abstract.py`: [`pccore.AbstractEnergy`][], the base of every variant (a leaf module);
- `_base.py`: the helpers variants share, [`pccore.AbstractChainEnergy`][] and [`pccore.PC`][];
- `_api.py`: [`pccore.energy`][], [`pccore.layer_energies`][], [`pccore.init_activities`][];
- `_parts.py`: the check of a variant's loss, parameterisation and regularisers;
- one module per variant (`_epc.py`, `_bidirectional.py`, `_graph.py`) and per part
  (`_loss.py`, `_parameterisation.py`, `_regularise.py`, `_init.py`).

Nothing is imported here: each importer names the module it needs, so the package has no
import cycles with the validation module (`pccore/_check.py`).
"""

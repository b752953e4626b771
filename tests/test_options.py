"""Options of a transfer (options.py): a TransferOptions object carries every setting into the
transfer (here the subspace mode, and no output file), keyword options given beside it are refused,
and so is an option value that does not exist."""
from __future__ import annotations

import pytest

import prolora
from prolora.errors import OptionError


def test_result_without_output_and_options_object(sdxl_pair):
    opts = prolora.TransferOptions(method="subspace", subspace="ratio:0.5", tau=0.0)
    res = prolora.transfer(sdxl_pair["source"], sdxl_pair["target"], sdxl_pair["peft"], options=opts)
    assert res.output is None and res.lora.modules
    assert all(r.k == round(0.5 * min(r.shape[0], r.shape[1])) for r in res.report.layers)
    with pytest.raises(OptionError):
        prolora.transfer(sdxl_pair["source"], sdxl_pair["target"], sdxl_pair["peft"], options=opts, tau=0.5)
    with pytest.raises(OptionError):
        prolora.TransferOptions(method="magic")

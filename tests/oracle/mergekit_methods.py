"""Oracle: run mergekit's own merge-method implementations on given tensors.

Run with the python of the side virtualenv that has mergekit installed, never
the project's. Usage:

    python mergekit_methods.py SPEC.json INPUTS.safetensors OUTPUT.safetensors

SPEC.json holds {"cases": [case, ...]}; each case is
    id           output tensor name
    method       mergekit method name
    inputs       names of the input tensors in INPUTS, in model order
    base_index   index of the base model in ``inputs``, or null
    params       global parameters (omitted ones take mergekit's defaults)
    model_params one dict of per-model parameters per input (may be empty)
    seed         torch.manual_seed before the merge (randomised methods)
    name         tensor name given to the method (optional)

Cases that raise are left out of OUTPUT; their messages are written to
OUTPUT + ".errors.json" as {id: message}.
"""
import json
import sys

import torch
from mergekit import merge_methods
from mergekit.merge_methods.base import ParameterScope
from safetensors.torch import load_file, save_file


def run_case(case, tensors):
    method = merge_methods.get(case["method"])
    inputs = [tensors[name] for name in case["inputs"]]
    base_index = case.get("base_index")
    parameters = dict(case.get("params") or {})
    model_params = case.get("model_params") or [{} for _ in inputs]
    # Per-input parameters go in as {input index: value}, over the inputs that
    # take them (every input, or every non-base input).
    for spec in method.spec.input_parameters:
        takers = [
            i
            for i in range(len(inputs))
            if spec.scope == ParameterScope.INPUT or i != base_index
        ]
        given = {i: model_params[i][spec.name] for i in takers if spec.name in model_params[i]}
        if given:
            parameters[spec.name] = given
    torch.manual_seed(int(case.get("seed", 0)))
    return merge_methods.merge_tensors(
        inputs,
        method,
        parameters=parameters,
        base_index=base_index,
        name=case.get("name"),
    )


def main(spec_path, inputs_path, output_path):
    with open(spec_path) as fh:
        cases = json.load(fh)["cases"]
    tensors = load_file(inputs_path)
    outputs, errors = {}, {}
    for case in cases:
        try:
            outputs[case["id"]] = run_case(case, tensors).contiguous()
        except Exception as exc:  # report, keep going with the other cases
            errors[case["id"]] = f"{type(exc).__name__}: {exc}"
    save_file(outputs, output_path)
    with open(output_path + ".errors.json", "w") as fh:
        json.dump(errors, fh, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])

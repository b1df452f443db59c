#!/usr/bin/env bash
# The whole path on a fresh machine: set up, train the tiny RSR model (base, then RSR),
# sample images, record a trace with hook points on, and report on it. Outputs: runs/demo/.
# DEMO_STEPS=50 ./scripts/demo.sh runs a quick smoke version (same commands, fewer steps).
# ./scripts/demo.sh --serve ends by starting the dashboard on the outputs (http://127.0.0.1:8050/).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out=runs/demo
mkdir -p "$out"
# The demo trains `tiny-shift` (rsr_model/tasks/shapes_shift.py): a base on plain coloured shapes, then
# an RSR stage on four caption-keyed colour styles the frozen base cannot make, with the learned routing
# recipe (upcycling, a soft phase, annealed hard routing; no planted cells), and beside it the same model
# trained under random routing (the control the Compare tab sets beside it). Stage lengths are shorter
# than the preset's; the whole demo took 1095 s from a fresh clone, alone on a 2-core machine.
base_steps=${DEMO_STEPS:-400}
rsr_steps=${DEMO_STEPS:-300}
preset=(--preset tiny-shift)

echo "== 1. train tiny-shift: the base backbone (plain shapes), then RSR on the styles, and the random-routing control"
python -m rsr_model train "${preset[@]}" --stage base --steps "$base_steps" --out "$out/base.pt" --overwrite
python -m rsr_model train "${preset[@]}" --stage rsr --base "$out/base.pt" --steps "$rsr_steps" \
    --out "$out/sd3_rsr.pt" --overwrite
python -m rsr_model train "${preset[@]}" --stage rsr --base "$out/base.pt" --steps "$rsr_steps" \
    --train-routing random --out "$out/control_random.pt" --overwrite
echo "== 2. sample"
python -m rsr_model sample --ckpt "$out/sd3_rsr.pt" --prompts-file examples/shift_prompts.txt --num-samples 2 \
    --out "$out/samples.png" --overwrite
echo "== 3. record traces (routing, gate probabilities, 64-token latents, early-exit decodes) of both models"
python -m probes.record --ckpt "$out/sd3_rsr.pt" --prompts examples/shift_prompts.txt --num-samples 4 \
    --probs --latent-tokens 64 --decode --timesteps 0:28:3 --out "$out/trace.h5" --overwrite
python -m probes.record --ckpt "$out/control_random.pt" --prompts examples/shift_prompts.txt --num-samples 4 \
    --probs --latent-tokens 64 --timesteps 0:28:3 --out "$out/control_trace.h5" --overwrite
echo "== 4. routing value (does the gate's choice lower the loss?) and the reports, with a verdict per step"
python -m probes.routing_value --ckpt "$out/sd3_rsr.pt" --json "$out/routing_value.json" --overwrite
python -m probes.report "$out/trace.h5" --json "$out/report.json" --figures "$out/figures" \
    --routing-value "$out/routing_value.json" --overwrite
python -m probes.report "$out/control_trace.h5" --json "$out/control_report.json" --overwrite
echo "outputs in $out/: base.pt, sd3_rsr.pt, control_random.pt, samples.png, trace.h5, control_trace.h5,"
echo "  routing_value.json, report.json, control_report.json, figures/"
echo "== 5. projections of the latents for the dashboard's latent explorer"
python -m probes.derive "$out/trace.h5" --overwrite
dashboard=(python -m dashboard "$out" --ckpt "$out/sd3_rsr.pt")
echo "== look: ${dashboard[*]}   then open http://127.0.0.1:8050/"
for arg in "$@"; do
  if [ "$arg" = "--serve" ]; then exec "${dashboard[@]}"; fi
done

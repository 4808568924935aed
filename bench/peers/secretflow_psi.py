"""One party of SecretFlow's PSI (spu 0.9.5), for the side-by-side benchmark.

Runs inside its own virtual environment (bench/psi_compare.py makes it; spu pins a
protobuf that conflicts with ours). Prints the party's wall time as JSON.

    python secretflow_psi.py --rank 0 --ports 61001,61002 --input a.csv --output a-out.csv
"""

import argparse
import json
import time

import spu.libspu as libspu
import spu.psi as psi

ap = argparse.ArgumentParser()
ap.add_argument("--rank", type=int, required=True)
ap.add_argument("--ports", required=True)
ap.add_argument("--input", required=True)
ap.add_argument("--output", required=True)
ap.add_argument("--protocol", default="ECDH", choices=["ECDH", "RR22", "KKRT"])
args = ap.parse_args()

desc = libspu.link.Desc() if hasattr(libspu.link, "Desc") else libspu.link.ContextDesc()
for i, port in enumerate(args.ports.split(",")):
    desc.add_party(f"party{i}", f"127.0.0.1:{port}")
desc.recv_timeout_ms = 600_000
lctx = libspu.link.create_brpc(desc, args.rank)
protocol = {
    "ECDH": psi.PsiProtocol.PROTOCOL_ECDH,
    "RR22": psi.PsiProtocol.PROTOCOL_RR22,
    "KKRT": psi.PsiProtocol.PROTOCOL_KKRT,
}[args.protocol]
config = psi.PsiExecuteConfig(
    protocol_conf=psi.PsiProtocolConfig(
        protocol=protocol,
        receiver_rank=0,
        broadcast_result=True,
        ecdh_params=psi.EcdhParams(curve=psi.EllipticCurveType.CURVE_25519),
    ),
    input_params=psi.InputParams(path=args.input, selected_keys=["id"], keys_unique=True),
    output_params=psi.OutputParams(path=args.output, disable_alignment=True),
)
t = time.perf_counter()
report = psi.psi_execute(config, lctx)
print(
    json.dumps(
        {
            "rank": args.rank,
            "seconds": time.perf_counter() - t,
            "intersection": report.intersection_count,
        }
    )
)
lctx.stop_link()

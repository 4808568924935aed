"""OpenMined PSI (openmined-psi 2.0.6, P-256, one core), both parties in this process,
for the side-by-side benchmark. Prints wall time and intersection size as JSON.

    python openmined_psi.py a.csv b.csv
"""

import json
import sys
import time

import private_set_intersection.python as psi

with open(sys.argv[1]) as fa, open(sys.argv[2]) as fb:
    a, b = fa.read().split()[1:], fb.read().split()[1:]
t = time.perf_counter()
server = psi.server.CreateWithNewKey(True)
client = psi.client.CreateWithNewKey(True)
setup = psi.ServerSetup()
setup.ParseFromString(
    server.CreateSetupMessage(1e-9, len(b), a, psi.DataStructure.RAW).SerializeToString()
)
request = client.CreateRequest(b)
response = server.ProcessRequest(request)
found = client.GetIntersection(setup, response)
print(json.dumps({"seconds": time.perf_counter() - t, "intersection": len(found)}))

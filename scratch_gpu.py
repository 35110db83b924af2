import os, sys, time, json, warnings
warnings.filterwarnings("ignore")
import jax, jax.numpy as jnp, numpy as np
import pallas_mlstm as P
print(jax.devices(), flush=True)
rel=lambda a,b: float(jnp.linalg.norm((a-b).astype(jnp.float32))/jnp.linalg.norm(b.astype(jnp.float32)))
def inputs(B,NH,S,DK,DV,dtype,seed=0):
    ks=jax.random.split(jax.random.PRNGKey(seed),6)
    q=jax.random.normal(ks[0],(B,NH,S,DK),dtype);k=jax.random.normal(ks[1],(B,NH,S,DK),dtype);v=jax.random.normal(ks[2],(B,NH,S,DV),dtype)
    i=jax.random.normal(ks[3],(B,NH,S),jnp.float32); f=3+jax.random.normal(ks[4],(B,NH,S),jnp.float32)
    return q,k,v,i,f
def fwbw(backend, chunk):
    def loss(q,k,v,i,f):
        h=P.mlstm_chunkwise(q,k,v,i,f,backend=backend,chunk_size=chunk)
        return jnp.sum(h.astype(jnp.float32)**2)
    return jax.jit(jax.grad(loss,argnums=(0,1,2,3,4)))
def fw(backend, chunk):
    return jax.jit(lambda *a: P.mlstm_chunkwise(*a,backend=backend,chunk_size=chunk))
def bench(fn,args,n=20):
    out=fn(*args); jax.block_until_ready(out)
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); jax.block_until_ready(fn(*args)); ts.append(time.perf_counter()-t)
    return 1e3*float(np.median(ts))
# correctness small
for dtype in [jnp.float32, jnp.bfloat16]:
    a=inputs(2,3,256,64,128,dtype)
    a32=[x.astype(jnp.float32) for x in a]
    hr=fw("xla",64)(*a32); hp=fw("triton",64)(*a)
    gr=fwbw("xla",64)(*a32); gp=fwbw("triton",64)(*a)
    print(dtype.__name__, "fw", rel(hp,hr), "grads", [f"{rel(x,y):.1e}" for x,y in zip(gp,gr)], flush=True)
for name,(B,NH,S,DK,DV) in dict(small_heads=(4,16,4096,128,128), b7_short=(32,8,2048,256,512), b7=(8,8,8192,256,512)).items():
    a=inputs(B,NH,S,DK,DV,jnp.bfloat16)
    for chunk in [64,128]:
        try:
            tf=bench(fw("triton",chunk),a); tb=bench(fwbw("triton",chunk),a)
            print(name, chunk, f"triton fw {tf:.2f} ms fwbw {tb:.2f} ms", flush=True)
        except Exception as e:
            print(name, chunk, "FAILED", repr(e)[:2000], flush=True)
    xf=bench(fw("xla",128),a,5); xb=bench(fwbw("xla",128),a,5)
    print(name, f"xla fw {xf:.2f} fwbw {xb:.2f}", flush=True)

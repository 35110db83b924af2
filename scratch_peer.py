import time, warnings
warnings.filterwarnings("ignore")
import jax, jax.numpy as jnp, numpy as np
from mlstm_kernels.jax.chunkwise.triton_xl_chunk import mlstm_chunkwise__xl_chunk as peer
def inputs(B,NH,S,DK,DV,dtype,seed=0):
    ks=jax.random.split(jax.random.PRNGKey(seed),6)
    q=jax.random.normal(ks[0],(B,NH,S,DK),dtype);k=jax.random.normal(ks[1],(B,NH,S,DK),dtype);v=jax.random.normal(ks[2],(B,NH,S,DV),dtype)
    i=jax.random.normal(ks[3],(B,NH,S),jnp.float32); f=3+jax.random.normal(ks[4],(B,NH,S),jnp.float32)
    return q,k,v,i,f
def bench(fn,args,n=20):
    out=fn(*args); jax.block_until_ready(out)
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); jax.block_until_ready(fn(*args)); ts.append(time.perf_counter()-t)
    return 1e3*float(np.median(ts))
fw=jax.jit(lambda *a: peer(*a, chunk_size=128, autocast_kernel_dtype=jnp.bfloat16))
def loss(*a): return jnp.sum(peer(*a, chunk_size=128, autocast_kernel_dtype=jnp.bfloat16).astype(jnp.float32)**2)
fb=jax.jit(jax.grad(loss,argnums=(0,1,2,3,4)))
for name,(B,NH,S,DK,DV) in dict(small_heads=(4,16,4096,128,128), b7_short=(32,8,2048,256,512), b7=(8,8,8192,256,512)).items():
    a=inputs(B,NH,S,DK,DV,jnp.bfloat16)
    print(name, f"peer fw {bench(fw,a):.2f} fwbw {bench(fb,a):.2f}", flush=True)

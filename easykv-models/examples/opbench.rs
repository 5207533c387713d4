use burn::backend::Flex;
use burn::prelude::*;
use std::time::Instant;
type B = Flex;
fn time<F: FnMut()>(name: &str, n: usize, mut f: F) {
    f();
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    println!("{name}: {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / n as f64);
}
fn main() {
    let d = Default::default();
    let x = Tensor::<B, 3>::random([1, 1, 576], burn::tensor::Distribution::Default, &d);
    let w = Tensor::<B, 2>::random([576, 576], burn::tensor::Distribution::Default, &d);
    let wt = Tensor::<B, 2>::random([576, 1536], burn::tensor::Distribution::Default, &d);
    let head = Tensor::<B, 2>::random([576, 49152], burn::tensor::Distribution::Default, &d);
    let head_t = Tensor::<B, 2>::random([49152, 576], burn::tensor::Distribution::Default, &d);
    time("x@W 576x576", 200, || {
        let _ = x.clone().matmul(w.clone().unsqueeze::<3>()).into_data();
    });
    time("x@W 576x1536", 200, || {
        let _ = x.clone().matmul(wt.clone().unsqueeze::<3>()).into_data();
    });
    time("x@head 576x49152", 20, || {
        let _ = x.clone().matmul(head.clone().unsqueeze::<3>()).into_data();
    });
    let x2 = x.clone().reshape([576, 1]);
    time("head_t@x 49152x576 x 576x1", 20, || {
        let _ = head_t.clone().matmul(x2.clone()).into_data();
    });
    time("x2d@head", 20, || {
        let _ = x.clone().reshape([1, 576]).matmul(head.clone()).into_data();
    });
    let a = Tensor::<B, 4>::random([1, 3, 3, 64], burn::tensor::Distribution::Default, &d);
    let k = Tensor::<B, 4>::random([1, 3, 600, 64], burn::tensor::Distribution::Default, &d);
    time("scores q@K^T N=600", 200, || {
        let _ = a.clone().matmul(k.clone().swap_dims(2, 3)).into_data();
    });
    time("cat K N=600", 200, || {
        let _ = Tensor::cat(vec![k.clone(), a.clone().slice_dim(2, 0..1)], 2).into_data();
    });
    use burn::tensor::DType;
    let head16 = head.clone().cast(DType::F16);
    let x16 = x.clone().cast(DType::F16);
    time("f16 x@head", 20, || {
        let _ = x16.clone().matmul(head16.clone().unsqueeze::<3>()).into_data();
    });
    time("f32->f16 x@head ->f32", 20, || {
        let _ = x
            .clone()
            .cast(DType::F16)
            .matmul(head16.clone().unsqueeze::<3>())
            .cast(DType::F32)
            .into_data();
    });
    let headb = head.clone().cast(DType::BF16);
    time("bf16 x@head", 20, || {
        let _ = x
            .clone()
            .cast(DType::BF16)
            .matmul(headb.clone().unsqueeze::<3>())
            .into_data();
    });
    let headt16 = head_t.clone().cast(DType::F16);
    time("f16 head_t@x", 20, || {
        let _ = headt16.clone().matmul(x2.clone().cast(DType::F16)).into_data();
    });
    let x512 = Tensor::<B, 3>::random([1, 512, 576], burn::tensor::Distribution::Default, &d);
    time("prefill 512 x@W 576x1536", 10, || {
        let _ = x512.clone().matmul(wt.clone().unsqueeze::<3>()).into_data();
    });
    let wt16 = wt.clone().cast(DType::F16);
    time("prefill 512 f16 x@W 576x1536", 10, || {
        let _ = x512
            .clone()
            .cast(DType::F16)
            .matmul(wt16.clone().unsqueeze::<3>())
            .into_data();
    });
    let sc = Tensor::<B, 3>::random([1, 3, 650], burn::tensor::Distribution::Default, &d);
    time("argsort [1,3,650]", 200, || {
        let _ = sc.clone().argsort(2).into_data();
    });
    let idx = sc.clone().argsort(2).slice_dim(2, 0..642);
    time("gather [1,3,650]->642", 200, || {
        let _ = sc.clone().gather(2, idx.clone()).into_data();
    });
    let kk = Tensor::<B, 4>::random([1, 3, 650, 64], burn::tensor::Distribution::Default, &d);
    let idx4 = idx.clone().unsqueeze_dim::<4>(3).repeat_dim(3, 64);
    time("gather K [1,3,650,64]", 200, || {
        let _ = kk.clone().gather(2, idx4.clone()).into_data();
    });
    time("repeat idx4", 200, || {
        let _ = idx.clone().unsqueeze_dim::<4>(3).repeat_dim(3, 64).into_data();
    });
    time("scatter", 200, || {
        let _ = Tensor::<B, 3, Int>::zeros([1, 3, 650], &d)
            .scatter(
                2,
                idx.clone().slice_dim(2, 0..8),
                Tensor::ones([1, 3, 8], &d),
                burn::tensor::IndexingUpdateOp::Add,
            )
            .into_data();
    });
    let flat = (idx.clone() + Tensor::<B, 1, Int>::arange_step(0..(3 * 650) as i64, 650, &d).reshape([1, 3, 1]))
        .reshape([3 * 642]);
    time("select rows K", 200, || {
        let _ = kk
            .clone()
            .reshape([3 * 650, 64])
            .select(0, flat.clone())
            .reshape([1, 3, 642, 64])
            .into_data();
    });
    for m in [1usize, 8, 64] {
        let xm = Tensor::<B, 2>::random([m, 576], burn::tensor::Distribution::Default, &d);
        let w_io = Tensor::<B, 2>::random([576, 1536], burn::tensor::Distribution::Default, &d);
        let w_oi = Tensor::<B, 2>::random([1536, 576], burn::tensor::Distribution::Default, &d);
        time(&format!("m={m} x@W[in,out]"), 50, || {
            let _ = xm.clone().matmul(w_io.clone()).into_data();
        });
        time(&format!("m={m} (W[out,in]@x^T)^T"), 50, || {
            let _ = w_oi.clone().matmul(xm.clone().transpose()).transpose().into_data();
        });
        let w16 = w_io.clone().cast(DType::F16);
        time(&format!("m={m} f16 x@W[in,out]"), 50, || {
            let _ = xm
                .clone()
                .cast(DType::F16)
                .matmul(w16.clone())
                .cast(DType::F32)
                .into_data();
        });
    }
    let shapes = [
        (576usize, 576usize),
        (576, 192),
        (576, 192),
        (576, 576),
        (576, 1536),
        (576, 1536),
        (1536, 576),
    ];
    let ws: Vec<Tensor<B, 2>> = (0..30)
        .flat_map(|_| {
            shapes
                .iter()
                .map(|&(i, o)| Tensor::<B, 2>::random([i, o], burn::tensor::Distribution::Default, &d))
        })
        .collect();
    for m in [1usize, 8, 16, 64] {
        let xs: Vec<Tensor<B, 2>> = shapes
            .iter()
            .map(|&(i, _)| Tensor::<B, 2>::random([m, i], burn::tensor::Distribution::Default, &d))
            .collect();
        time(&format!("cold 30 layers m={m}"), 5, || {
            for (j, w) in ws.iter().enumerate() {
                let _ = xs[j % 7].clone().matmul(w.clone()).into_data();
            }
        });
    }
    let wts: Vec<Tensor<B, 2>> = (0..30)
        .flat_map(|_| {
            shapes
                .iter()
                .map(|&(i, o)| Tensor::<B, 2>::random([o, i], burn::tensor::Distribution::Default, &d))
        })
        .collect();
    for m in [1usize, 8, 16, 64] {
        let xs: Vec<Tensor<B, 2>> = shapes
            .iter()
            .map(|&(i, _)| Tensor::<B, 2>::random([i, m], burn::tensor::Distribution::Default, &d))
            .collect();
        time(&format!("cold W@x^T 30 layers m={m}"), 5, || {
            for (j, w) in wts.iter().enumerate() {
                let _ = w.clone().matmul(xs[j % 7].clone()).transpose().into_data();
            }
        });
    }
    for m in [32usize, 512] {
        let xs: Vec<Tensor<B, 2>> = shapes
            .iter()
            .map(|&(i, _)| Tensor::<B, 2>::random([m, i], burn::tensor::Distribution::Default, &d))
            .collect();
        time(&format!("cold x@W[in,out] m={m}"), 3, || {
            for (j, w) in ws.iter().enumerate() {
                let _ = xs[j % 7].clone().matmul(w.clone()).into_data();
            }
        });
        time(&format!("cold x@W[out,in]^T m={m}"), 3, || {
            for (j, w) in wts.iter().enumerate() {
                let _ = xs[j % 7].clone().matmul(w.clone().transpose()).into_data();
            }
        });
        time(&format!("cold (W@x^T)^T m={m}"), 3, || {
            for (j, w) in wts.iter().enumerate() {
                let _ = w.clone().matmul(xs[j % 7].clone().transpose()).transpose().into_data();
            }
        });
    }
    time("small add", 1000, || {
        let _ = (x.clone() + x.clone()).into_data();
    });
    time("softmax", 1000, || {
        let _ = burn::tensor::activation::softmax(x.clone(), 2).into_data();
    });
}
#[allow(dead_code)]
fn f16bench() {}

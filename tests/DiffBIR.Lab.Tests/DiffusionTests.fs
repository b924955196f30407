/// Diffusion core: samplers replayed against the official runs, restoration guidance, the sample-step / guide loop.
module DiffBIR.Lab.Tests.DiffusionTests

open System
open System.IO
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Diffusion
open DiffBIR.Lab.Sampling
open DiffBIR.Lab.Guidance
open DiffBIR.Lab.Parity
open DiffBIR.Lab.Tests.TestSupport

let private ti (i: int) = torch.TensorIndex.Single(int64 i)
let private sl (a: int) (b: int) = torch.TensorIndex.Slice(int64 a, int64 b)
let private maxAbs (a: torch.Tensor) (b: torch.Tensor) = (a - b).abs().max().item<float32>() |> float

// ---------------------------------------------------------------- parity

[<Fact>]
let ``every official sampler run replays: call inputs, step states, buffers and z match`` () =
    let r = assertParity "samplers.safetensors"
    r.Outputs.Count |> should be (greaterThan 1000)
    // apart from the replayed network answers, everything was compared
    r.Outputs |> Seq.filter (fun o -> o.Skipped) |> Seq.forall (fun o -> o.Name.EndsWith ".out") |> should be True
    r.WorstRel |> should be (lessThan 1e-6)

[<Fact>]
let ``restoration guidance matches cond_fn.py (even and odd sizes)`` () = assertParity "guidance.safetensors" |> ignore

[<Fact>]
let ``v2.0.0 weight map and guidance gradients match`` () = assertParity (Path.Combine("v2.0.0", "weight_map.safetensors")) |> ignore

[<Fact>]
let ``v2.0.0 respaced schedule matches bit for bit`` () =
    let r = assertParity (Path.Combine("v2.0.0", "spaced_schedule.safetensors"))
    r.WorstRel |> should equal 0.0

[<Fact>]
let ``noise schedules of v2 and v2.1 match`` () = assertParity "diffusion_schedule.safetensors" |> ignore

// ---------------------------------------------------------------- samplers by name

[<Fact>]
let ``a sampler is one argument: every official sampler_type resolves, unknown names are refused`` () =
    for name in Samplers.Names do
        (Samplers.Create(name, NoiseSchedule.V2_1)).Name |> should equal name
    (fun () -> Samplers.Create("edm_nonsense", NoiseSchedule.V2) |> ignore) |> should throw typeof<ArgumentException>
    (fun () -> Samplers.Create("plms", NoiseSchedule.V2) |> ignore) |> should throw typeof<ArgumentException>

[<Fact>]
let ``EDM schedule: sigma_max is 1e4 for v2 and v2.1, timesteps 999 749 499 249 0`` () =
    for s in [ NoiseSchedule.V2; NoiseSchedule.V2_1 ] do
        let e = Samplers.Create("edm_euler", s) :?> EdmSampler
        let struct (sigmas, ts) = e.Schedule64 4
        sigmas.[0] |> should (equalWithin 1e-3) 1e4
        sigmas.[4] |> should equal 0.0
        ts |> should equal [| 999L; 749L; 499L; 249L; 0L |]

// ---------------------------------------------------------------- the ten-line loop

/// The user's own loop: sample-step and guide as plain calls, with the replay denoiser standing in for ControlLDM.
[<Fact>]
let ``a ten-line F# loop drives the official default sampler and reproduces its latent`` () =
    use f = Fixture.Load(fixture "samplers.safetensors")
    let run = "v2.1.edm_dpm++_3m_sde"
    let calls = [ for k in 0 .. 7 -> f.Out(sprintf "%s.call.%02d.out" run k) ]
    let denoiser = ReplayDenoiser(calls)
    let model = CfgDenoiser(denoiser, Conditioning(f.In "cond.c_txt", f.In "cond.c_img"), Conditioning(f.In "uncond.c_txt", f.In "uncond.c_img"))
    let seen = ResizeArray<int * int>()
    // ---- the loop
    let sampler = Samplers.Create("edm_dpm++_3m_sde", NoiseSchedule.V2_1, SamplerOptions(CfgScale = 4.0))
    use state = sampler.Start(f.In "x_T", 4, ReplayNoise(f.In(run + ".noise")))
    while not state.IsDone do
        use _ = torch.NewDisposeScope()
        let req = state.Request
        let out = model.Predict req                       // classifier-free guided model output
        let x0 = req.ToX0.Invoke out                             // predicted clean latent
        if req.IsFirstOfStep then seen.Add((req.Step, req.Timestep))
        state.Step(out)                                   // sample-step
    // ----
    maxAbs state.Result (f.Out(run + ".z")) |> should be (lessThan 1e-5)
    List.ofSeq seen |> should equal [ (0, 999); (1, 749); (2, 499); (3, 249) ]
    denoiser.Calls |> should equal 8

[<Fact>]
let ``the observer sees every step (t, z_t, x0) and can cancel the run`` () =
    use f = Fixture.Load(fixture "samplers.safetensors")
    let run = "v2.spaced"
    let calls = [ for k in 0 .. 7 -> f.Out(sprintf "%s.call.%02d.out" run k) ]
    let mk () = CfgDenoiser(ReplayDenoiser(calls), Conditioning(f.In "cond.c_txt", f.In "cond.c_img"), Conditioning(f.In "uncond.c_txt", f.In "uncond.c_img"))
    let sampler = Samplers.Create("spaced", NoiseSchedule.V2, SamplerOptions(CfgScale = 4.0))
    let steps = ResizeArray<StepInfo>()
    let s1 = DiffBIR.Lab.Stages.SampleStep(sampler, mk ())
    use r1 = s1.Start(f.In "x_T", 4, ReplayNoise(f.In(run + ".noise")))
    let z = SamplingLoop.Run(s1, r1, null, fun i -> steps.Add i; true)
    maxAbs z (f.Out(run + ".z")) |> should equal 0.0
    steps |> Seq.map (fun s -> s.Timestep) |> List.ofSeq |> should equal [ 999; 666; 333; 0 ]
    steps |> Seq.forall (fun s -> not s.GuidanceApplied && s.GuidanceLoss.HasValue = false) |> should be True
    let s2 = DiffBIR.Lab.Stages.SampleStep(sampler, mk ())
    use r2 = s2.Start(f.In "x_T", 4, ReplayNoise(f.In(run + ".noise")))
    let cancelled = SamplingLoop.Run(s2, r2, null, fun i -> i.Step < 1)
    cancelled |> should be Null
    r2.IsDone |> should be False

/// A deterministic stand-in network (no weights): eps = 0.1·x + 0.01·t/1000·c_img.
type private ToyDenoiser() =
    interface IDenoiser with
        member _.Forward(x, t, c) =
            let tt = t.to_type(torch.float32).view(-1L, 1L, 1L, 1L) / 1000.0
            x * 0.1 + c.CImage * tt * 0.01

[<Fact>]
let ``same seed gives bit-identical latents on CPU, another seed does not`` () =
    let cond = Conditioning(torch.zeros(1L, 77L, 8L), torch.ones(1L, 4L, 8L, 8L))
    let neg = Conditioning(torch.ones(1L, 77L, 8L), torch.ones(1L, 4L, 8L, 8L))
    let sampleWith (seed: int64) name =
        use noise = new SeededNoise(seed)
        let xT = noise.Next(torch.zeros(1L, 4L, 8L, 8L))
        sampleAll name NoiseSchedule.V2_1 (SamplerOptions(CfgScale = 4.0)) (CfgDenoiser(ToyDenoiser(), cond, neg)) xT 5 noise null null
    for name in [ "edm_dpm++_3m_sde"; "spaced"; "edm_euler_a"; "dpm++_m2" ] do
        let a = sampleWith 231L name
        let b = sampleWith 231L name
        let c = sampleWith 232L name
        (a.equal(b).all().item<bool>()) |> should be True
        (a.equal(c).all().item<bool>()) |> should be False

// ---------------------------------------------------------------- gradient map

let private image (seed: int64) h w =
    let g = new torch.Generator(uint64 seed)
    torch.rand([| 1L; 3L; h; w |], generator = g)

[<Fact>]
let ``weight map is 1 − tanh of the 2×2 patch sum of Sobel magnitudes (official map)`` () =
    use f = Fixture.Load(fixture (Path.Combine("v2.0.0", "weight_map.safetensors")))
    let w = GradientMap.WeightMap(f.In "wmap0.image", 2)
    // Bit-exact on some CPUs; on others libtorch's vectorised tanh/sqrt (chosen by the CPU's instruction set) is one
    // float32 ulp off near 1.0 (5.96e-8 seen). Two ulps is still far below any real difference.
    maxAbs w (f.Out "wmap0.weight") |> should be (lessThanOrEqualTo 1.2e-7)
    let mag = GradientMap.SobelMagnitude(f.In "wmap0.image")
    let manual = 1.0f - MathF.Tanh(mag.[0L, 0L, 2L, 4L].item<float32>() + mag.[0L, 0L, 2L, 5L].item<float32>() + mag.[0L, 0L, 3L, 4L].item<float32>() + mag.[0L, 0L, 3L, 5L].item<float32>())
    w.[0L, 0L, 3L, 5L].item<float32>() |> should (equalWithin 1e-6) manual

[<Fact>]
let ``patch size 1 is per pixel: W = 1 − tanh(|∇I|)`` () =
    let img = image 1L 12L 10L
    let w = GradientMap.WeightMap(img, 1)
    maxAbs w (1.0 - GradientMap.SobelMagnitude(img).tanh()) |> should be (lessThan 1e-7)

[<Theory>]
[<InlineData(4)>]
[<InlineData(8)>]
[<InlineData(16)>]
let ``patch size p: W is constant on each p×p patch and equals 1 − tanh(patch sum)`` (p: int) =
    let img = image 2L 32L 48L
    let w = GradientMap.WeightMap(img, p)
    let mag = GradientMap.SobelMagnitude img
    for (pi, pj) in [ (0, 0); (1, 2); (32 / p - 1, 48 / p - 1) ] do
        let block = mag.[ti 0, ti 0, sl (pi * p) (pi * p + p), sl (pj * p) (pj * p + p)]
        let expected = 1.0 - Math.Tanh(float (block.sum().item<float32>()))
        let wb = w.[ti 0, ti 0, sl (pi * p) (pi * p + p), sl (pj * p) (pj * p + p)]
        float (wb.max().item<float32>()) |> should (equalWithin 1e-6) expected
        float (wb.min().item<float32>()) |> should (equalWithin 1e-6) expected

[<Theory>]
[<InlineData(2)>]
[<InlineData(4)>]
[<InlineData(16)>]
let ``sizes p does not divide: the last patches are partial and sum only the pixels that exist`` (p: int) =
    let img = image 3L 33L 47L           // the official code raises here (odd H, W)
    let w = GradientMap.WeightMap(img, p)
    w.shape |> should equal [| 1L; 1L; 33L; 47L |]
    let mag = GradientMap.SobelMagnitude img
    let lastI, lastJ = (33 - 1) / p * p, (47 - 1) / p * p
    let corner = mag.[ti 0, ti 0, sl lastI 33, sl lastJ 47]
    let expected = 1.0 - Math.Tanh(float (corner.sum().item<float32>()))
    float (w.[0L, 0L, 32L, 46L].item<float32>()) |> should (equalWithin 1e-6) expected
    float (w.[0L, 0L, int64 lastI, int64 lastJ].item<float32>()) |> should (equalWithin 1e-6) expected
    // full patches away from the partial edge are unchanged by the size: same as on the divisible crop's interior rows
    let inner = mag.[ti 0, ti 0, sl 0 p, sl 0 p]
    float (w.[0L, 0L, 0L, 0L].item<float32>()) |> should (equalWithin 1e-6) (1.0 - Math.Tanh(float (inner.sum().item<float32>())))

// ---------------------------------------------------------------- guidance scale and schedules

[<Fact>]
let ``g = −∂L/∂x̂₀ · s·3000 (the official stored scale); the window is t_stop < t+1 < t_start`` () =
    let g = MseGuidance(Scale = 0.5, TStart = 800, TStop = 200)
    [ 999; 749; 500; 250; 0 ] |> List.map g.IsActive |> should equal [ false; true; true; true; false ]
    let target = torch.zeros(1L, 3L, 4L, 4L)
    let pred = torch.ones(1L, 3L, 4L, 4L)
    let struct (gr, loss) = g.Gradient(target, pred, 500)
    loss |> should (equalWithin 1e-7) 1.0
    // ∂/∂pred mean((pred−0)²) = 2·pred/48 per element
    float (gr.[0L, 0L, 0L, 0L].item<float32>()) |> should (equalWithin 1e-4) (-(2.0 / 48.0) * 1500.0)

[<Fact>]
let ``scale schedules give the effective scale per step (constant, linear, cosine, piecewise, any function)`` () =
    let steps = SpacedSampler.SpaceTimesteps(1000, 4) |> Array.rev        // 999 666 333 0
    let eff (s: GuidanceSchedule) = steps |> Array.map (fun t -> MseGuidance(Scale = 1.0, Schedule = s).ScaleAt t * 3000.0)
    eff (GuidanceSchedule.Constant 0.5) |> should equal [| 1500.0; 1500.0; 1500.0; 1500.0 |]
    eff (GuidanceSchedule.Linear(1.0, 0.0)) |> Array.map (fun v -> Math.Round(v, 6)) |> should equal [| 3000.0; 2000.0; 1000.0; 0.0 |]
    let cos = eff (GuidanceSchedule.Cosine(1.0, 0.0))
    cos.[0] |> should (equalWithin 1e-9) 3000.0
    cos.[3] |> should (equalWithin 1e-9) 0.0
    cos.[1] |> should (equalWithin 1e-6) (3000.0 * (1.0 - Math.Cos(Math.PI * 666.0 / 999.0)) / 2.0)
    eff (GuidanceSchedule.Piecewise(struct (500, 0.2), struct (0, 1.0))) |> should equal [| 600.0; 600.0; 3000.0; 3000.0 |]
    eff (GuidanceSchedule(Func<int, float>(fun t -> if t > 0 then 0.1 else 0.0))) |> should equal [| 300.0; 300.0; 300.0; 0.0 |]
    // and the gradient follows it: g(t) = g(s = 1) · s(t)
    let target = torch.zeros(1L, 3L, 4L, 4L)
    let pred = torch.ones(1L, 3L, 4L, 4L)
    let lin = MseGuidance(Scale = 1.0, Schedule = GuidanceSchedule.Linear(1.0, 0.0))
    let one = MseGuidance(Scale = 1.0)
    let struct (g666, _) = lin.Gradient(target, pred, 666)
    let struct (g1, _) = one.Gradient(target, pred, 666)
    maxAbs g666 (g1 * (666.0 / 999.0)) |> should be (lessThan 1e-3)

[<Fact>]
let ``guidance on x̂₀ works with every sampler: the loop reports loss and gradient norm and the result moves`` () =
    let cond = Conditioning(torch.zeros(1L, 77L, 8L), torch.ones(1L, 4L, 8L, 8L))
    let target = torch.zeros(1L, 4L, 8L, 8L)
    for name in [ "spaced"; "ddim"; "dpm++_m2"; "edm_euler"; "edm_heun"; "edm_dpm++_3m_sde" ] do
        let run guide =
            use noise = new SeededNoise(7L)
            let xT = noise.Next(torch.zeros(1L, 4L, 8L, 8L))
            let infos = ResizeArray<StepInfo>()
            let z = sampleAll name NoiseSchedule.V2 (SamplerOptions(CfgScale = 1.0)) (CfgDenoiser(ToyDenoiser(), cond, null)) xT 4 noise guide (Func<_, _>(fun i -> infos.Add i; true))
            z, infos
        let z0, _ = run null
        let guide = Guide(MseGuidance(Scale = 0.002, Space = GuidanceSpace.Latent), target)
        let z1, infos = run guide
        infos.Count |> should equal 4
        infos |> Seq.forall (fun i -> i.GuidanceApplied && i.GuidanceLoss.HasValue && i.GradientNorm.Value > 0.0) |> should be True
        // pulled towards the zero target
        float (z1.abs().mean().item<float32>()) |> should be (lessThan (float (z0.abs().mean().item<float32>())))

// ---------------------------------------------------------------- v2.0.0 guided sampler, replayed

/// v2.0.0/sampler_guided: the spaced sampler with the recorded CFG ε per step (no network), and, for the guided
/// variants, the recorded guided x̂₀ fed back: our x̂₀, our update from the guided x̂₀ and z must match.
[<Theory>]
[<InlineData("a_none")>]
[<InlineData("b_mse_rgb")>]
[<InlineData("c_wmse_rgb")>]
[<InlineData("d_mse_latent")>]
[<InlineData("e_wmse_rgb_repeat2")>]
[<InlineData("f_mse_rgb_window")>]
let ``v2.0.0 guided spaced sampling replays from the recorded eps and guided x0`` (variant: string) =
    use f = Fixture.Load(fixture (Path.Combine("v2.0.0", "sampler_guided.safetensors")))
    let steps = 5
    let eps = [ for k in 0 .. steps - 1 -> f.Out(sprintf "%s.step%d.eps" variant k) ]
    // latent guidance draws one VAE posterior sample per step before p_sample's draw: keep p_sample's draws only
    let draws = [ for k in 0 .. 20 do if f.Tensors.ContainsKey(sprintf "noise.%s.%d" variant k) then yield f.Get(sprintf "noise.%s.%d" variant k) ]
    let pDraws = if draws.Length = 2 * steps then [ for k in 0 .. steps - 1 -> draws.[2 * k + 1] ] else draws
    let model = CfgDenoiser(ReplayDenoiser(eps), Conditioning(f.In "cond.c_txt", f.In "cond.c_img"), null)
    let sampler = Samplers.Create("spaced", NoiseSchedule.V2, SamplerOptions(CfgScale = 1.0))
    use run = sampler.Start(f.In "x_T", steps, ReplayNoise(torch.stack(pDraws)))
    let mutable k = 0
    while not run.IsDone do
        use _ = torch.NewDisposeScope()
        let req = run.Request
        let out = model.Predict req
        maxAbs (req.ToX0.Invoke out) (f.Out(sprintf "%s.step%d.pred_x0" variant k)) |> should be (lessThan 1e-4)
        let guidedKey = sprintf "out.%s.step%d.pred_x0_guided" variant k
        if f.Tensors.ContainsKey guidedKey then run.Step(out, f.Get guidedKey) else run.Step(out)
        k <- k + 1
    let z = f.Out(variant + ".z")
    let rel = maxAbs run.Result z / float (z.abs().max().item<float32>())
    rel |> should be (lessThan 1e-5)

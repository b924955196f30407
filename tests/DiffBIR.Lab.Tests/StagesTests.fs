/// The five stages of DiffBIR (restore, encode, sample-step, guide, decode) with the real tiny ControlLDM: the
/// official v2.0.0 guided and tiled samplers reproduced, a user's ten-line loop equal to the built-in one, tiled
/// sampling with guidance, cancellation, and a flat tensor count over a long guided run.
[<Xunit.Collection("torch-threads")>]
module DiffBIR.Lab.Tests.StagesTests

open System
open System.IO
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Diffusion
open DiffBIR.Lab.Sampling
open DiffBIR.Lab.Guidance
open DiffBIR.Lab.Parity
open DiffBIR.Lab.Stages
open DiffBIR.Lab.Tests.TestSupport


let private guidedFixture () = Fixture.Load(fixture (Path.Combine("v2.0.0", "sampler_guided.safetensors")))

/// A random text condition [1, 77, 32] (the tiny model's CLIP weights are not in sampler_guided.safetensors).
let private randomText (seed: int64) =
    use g = new torch.Generator(uint64 seed)
    torch.randn([| 1L; 77L; 32L |], generator = g)

/// A smooth random RGB image in [0, 1] standing in for a low-quality input.
let private randomImage (seed: int64) (h: int64) (w: int64) =
    use g = new torch.Generator(uint64 seed)
    let coarse = torch.rand([| 1L; 3L; h / 8L; w / 8L |], generator = g)
    torch.nn.functional.interpolate(coarse, [| h; w |], mode = torch.InterpolationMode.Bilinear, align_corners = false)

/// Runs f on one libtorch thread and restores the previous count. The fixtures were made with one thread (replay is
/// then bit-exact, rgb guidance included), and on 2 cores shared with other jobs OpenMP's second thread makes these
/// small tensors slower, not faster (measured: tiny UNet+ControlNet forward 430 ms with 2 threads, 60 ms with 1).
let private oneThread (f: unit -> 'a) =
    let before = torch.get_num_threads ()
    torch.set_num_threads 1
    try f () finally torch.set_num_threads before

let private spaced cfg = Samplers.Create("spaced", NoiseSchedule.V2, SamplerOptions(CfgScale = cfg))

// ---------------------------------------------------------------- parity with the official v2.0.0 sampler

[<Fact>]
let ``v2.0.0 guided sampling with the tiny ControlLDM matches the official run: no guidance, MSE and WMSE in rgb and latent space, repeat 2, window`` () =
    let r = oneThread (fun () -> assertParity (Path.Combine("v2.0.0", "sampler_guided.safetensors")))
    r.Outputs.Count |> should be (greaterThanOrEqualTo 124)

[<Fact>]
let ``v2.0.0 tiled noise prediction blends gaussian-weighted latent tiles and tiled sampling matches the official run`` () =
    oneThread (fun () -> assertParity (Path.Combine("v2.0.0", "tiled.safetensors"))) |> ignore

// ---------------------------------------------------------------- the user's ten-line loop

/// The README's ten-line loop, verbatim between the markers, on the v2.0.0 sampler_guided fixture (variant c_wmse_rgb:
/// spaced sampler, CFG 4, 5 steps, weighted-MSE guidance s = 0.5 in rgb space): the official latent z is reproduced,
/// and the library's own loop (SamplingLoop.Run) gives exactly the same latent.
[<Fact>]
let ``the README's ten-line F# loop of restore, encode, sample-step, guide and decode reproduces the official v2.0.0 guided run`` () = oneThread <| fun () ->
    use f = guidedFixture ()
    use model = V2TinyModel.Load f
    let lq = f.In "clean"                                      // the fixture's stage-1 output; Identity stands in for the cleaner
    let positive, negative = f.In "cond.c_txt", f.In "uncond.c_txt"
    let xT, noise = f.In "x_T", ReplayNoise(V2TinyModel.Noise(f, "c_wmse_rgb"))
    let restore, encode, decode = Restore(torch.nn.Identity()), Encode(model), Decode(model)
    // ---- the loop (README, "The stages in ten lines")
    let restored = restore.Apply lq                                             // I_RM
    let cond = Conditioning(positive, encode.Image restored)                    // c = (c_txt, c_img)
    let stepper = SampleStep(Samplers.Create("spaced", NoiseSchedule.V2, SamplerOptions(CfgScale = 4.0)), model, cond, Conditioning(negative, cond.CImage))
    let guide = GuideStage.For(model, WeightedMseGuidance(Scale = 0.5), restored, noise)
    let mutable state = stepper.Start(xT, 5, noise)
    while not state.IsDone do
        use _ = torch.NewDisposeScope()
        let p = stepper.Predict state                                           // ε̃ and x̂₀ at z_t
        state <- stepper.Step(state, p, (guide.Apply p).X0)                     // x̂₀ guided toward I_RM, then z_t → z_{t−1}
    let image = decode.Apply state.Latent
    // ----
    let z, expected = state.Latent, f.Out "c_wmse_rgb.z"
    noise.Used |> should equal noise.Count
    float ((z - expected).abs().max().item<float32>() / expected.abs().max().item<float32>()) |> should be (lessThan 1e-5)
    image.shape |> should equal [| 1L; 3L; 64L; 64L |]
    let noise2 = ReplayNoise(V2TinyModel.Noise(f, "c_wmse_rgb"))
    use builtIn = stepper.Start(xT, 5, noise2)
    let theirs = SamplingLoop.Run(stepper, builtIn, GuideStage.For(model, WeightedMseGuidance(Scale = 0.5), restored, noise2))
    (z.equal(theirs).all().item<bool>()) |> should be True
    state.Dispose()

/// A deterministic stand-in network: ε = 0.1·x + 0.01·(t/1000)·c_img.
let private toy =
    { new IDenoiser with
        member _.Forward(x, t, c) = x * 0.1 + c.CImage * (t.to_type(torch.float32).view(-1L, 1L, 1L, 1L) / 1000.0) * 0.01 }

[<Theory>]
[<InlineData("spaced")>]
[<InlineData("ddim")>]
[<InlineData("dpm++_m2")>]
[<InlineData("edm_heun")>]
[<InlineData("edm_dpm++_3m_sde")>]
let ``Predict, guide and Step by hand equal the built-in loop for every sampler, inside and outside the guidance window`` (name: string) =
    let cond = Conditioning(torch.zeros(1L, 77L, 8L), torch.ones(1L, 4L, 8L, 8L))
    let neg = Conditioning(torch.ones(1L, 77L, 8L), torch.ones(1L, 4L, 8L, 8L))
    let stepper = SampleStep(Samplers.Create(name, NoiseSchedule.V2, SamplerOptions(CfgScale = 3.0)), toy, cond, neg)
    let guide = Guide(MseGuidance(Scale = 0.002, Space = GuidanceSpace.Latent, TStart = 700, TStop = 200), torch.zeros(1L, 4L, 8L, 8L))
    let xT = (new SeededNoise(51L)).Next(torch.zeros(1L, 4L, 8L, 8L))
    let mutable state = stepper.Start(xT, 6, new SeededNoise(52L))
    while not state.IsDone do
        use _ = torch.NewDisposeScope()
        let p = stepper.Predict state
        state <- stepper.Step(state, p, (guide.Apply p).X0)
    use s2 = stepper.Start(xT, 6, new SeededNoise(52L))
    let builtIn = SamplingLoop.Run(stepper, s2, guide)
    (state.Latent.equal(builtIn).all().item<bool>()) |> should be True
    state.Dispose()

// ---------------------------------------------------------------- tiling with guidance

[<Fact>]
let ``tiled sampling with rgb guidance on the blended x̂₀ runs with every tile and moves the result toward the target`` () = oneThread <| fun () ->
    use f = guidedFixture ()
    use model = V2TinyModel.Load f
    let encode = Encode(model)
    let restored = randomImage 11L 96L 96L                      // 12×12 latent: four 8×8 tiles at stride 4
    let cond = Conditioning(randomText 12L, encode.Image restored)
    let tiled = TiledDenoiser(model, 8, 4)
    let xT = (new SeededNoise(13L)).Next(torch.zeros(1L, 4L, 12L, 12L))
    let target = Encode.Target restored
    let distance (z: torch.Tensor) =
        use _ = torch.no_grad()
        (model.VaeDecode z - target).square().mean().item<float32>() |> float
    let sample (guide: Guide) =
        let stepper = SampleStep(spaced 1.0, tiled, cond)
        use state = stepper.Start(xT, 3, new SeededNoise(14L))
        let infos = ResizeArray<StepInfo>()
        let z = SamplingLoop.Run(stepper, state, guide, fun i -> infos.Add i; true)
        z, infos
    let zPlain, _ = sample null
    let guide = GuideStage.For(model, MseGuidance(Scale = 2.0), restored)
    let zGuided, infos = sample guide
    infos.Count |> should equal 3
    infos |> Seq.forall (fun i -> i.GuidanceApplied && i.GuidanceLoss.HasValue && i.GradientNorm.Value > 0.0) |> should be True
    distance zGuided |> should be (lessThan (distance zPlain))

[<Fact>]
let ``a latent no larger than one tile goes to the network whole; a latent smaller than the tile in one direction is refused`` () =
    let calls = ResizeArray<int64[]>()
    let net =
        { new IDenoiser with
            member _.Forward(x, _, _) = calls.Add x.shape; x * 0.5 }
    let t = torch.tensor([| 999L |])
    let whole = TiledDenoiser(net, 8, 4).Forward(torch.ones(1L, 4L, 8L, 6L), t, Conditioning(torch.zeros(1L, 77L, 8L), torch.zeros(1L, 4L, 8L, 6L)))
    calls |> Seq.map (fun s -> s.[2], s.[3]) |> List.ofSeq |> should equal [ (8L, 6L) ]
    (whole.equal(torch.ones(1L, 4L, 8L, 6L) * 0.5).all().item<bool>()) |> should be True
    (fun () -> TiledDenoiser(net, 8, 4).Forward(torch.ones(1L, 4L, 12L, 6L), t, Conditioning(torch.zeros(1L, 77L, 8L), torch.zeros(1L, 4L, 12L, 6L))) |> ignore)
    |> should throw typeof<ArgumentException>
    // a constant network output survives the blend exactly where tiles overlap (weights are divided out)
    calls.Clear()
    let blended = TiledDenoiser(net, 8, 4).Forward(torch.ones(1L, 4L, 14L, 12L), t, Conditioning(torch.zeros(1L, 77L, 8L), torch.zeros(1L, 4L, 14L, 12L)))
    calls.Count |> should equal 6
    (blended - 0.5).abs().max().item<float32>() |> float |> should be (lessThan 1e-6)

[<Theory>]
[<InlineData("spaced")>]
[<InlineData("ddim")>]
[<InlineData("dpm++_m2")>]
[<InlineData("edm_dpm++_2m_sde")>]
let ``tiling wraps the network, so every sampler and CFG batching uses it: a pixel-wise network samples the same tiled and whole`` (name: string) =
    let cImg = torch.linspace(-1.0, 1.0, 4L * 14L * 12L).reshape(1L, 4L, 14L, 12L)
    let cond, neg = Conditioning(torch.zeros(1L, 77L, 8L), cImg), Conditioning(torch.ones(1L, 77L, 8L), cImg * 0.5)
    let sample (net: IDenoiser) =
        let xT = (new SeededNoise(61L)).Next(torch.zeros(1L, 4L, 14L, 12L))
        sampleAll name NoiseSchedule.V2 (SamplerOptions(CfgScale = 3.0)) (CfgDenoiser(net, cond, neg)) xT 4 (new SeededNoise(62L)) null null
    let whole, tiled = sample toy, sample (TiledDenoiser(toy, 8, 4))
    let rel = (whole - tiled).abs().max().item<float32>() / whole.abs().max().item<float32>()
    float rel |> should be (lessThan 1e-5)

// ---------------------------------------------------------------- observer and cancellation

[<Fact>]
let ``the observer sees t, z_t, x̂₀ (decoded on request), loss and gradient norm, and cancelling stops the run`` () = oneThread <| fun () ->
    use f = guidedFixture ()
    use model = V2TinyModel.Load f
    let restored = randomImage 21L 64L 64L
    let cond = Conditioning(randomText 22L, Encode(model).Image restored)
    let stepper = SampleStep(spaced 1.0, model, cond)
    let guide = GuideStage.For(model, MseGuidance(Scale = 0.5, Space = GuidanceSpace.Latent), restored)
    let xT = (new SeededNoise(23L)).Next(torch.zeros(1L, 4L, 8L, 8L))
    let seen = ResizeArray<int * int * float * float>()
    use state = stepper.Start(xT, 5, new SeededNoise(24L))
    let z = SamplingLoop.Run(stepper, state, guide, (fun i ->
        i.Zt.shape |> should equal [| 1L; 4L; 8L; 8L |]
        i.PredictedX0.shape |> should equal [| 1L; 4L; 8L; 8L |]
        if i.Step = 0 then i.DecodePredictedX0().shape |> should equal [| 1L; 3L; 64L; 64L |]
        seen.Add((i.Step, i.Timestep, i.GuidanceLoss.Value, i.GradientNorm.Value))
        i.Step < 2), Func<_, _>(model.VaeDecode))
    z |> should be Null
    state.IsDone |> should be False
    seen |> Seq.map (fun (s, t, _, _) -> s, t) |> List.ofSeq |> should equal [ (0, 999); (1, 749); (2, 500) ]
    seen |> Seq.forall (fun (_, _, l, n) -> l > 0.0 && n > 0.0) |> should be True

[<Fact>]
let ``a used-up sampling state is refused: states are linear`` () = oneThread <| fun () ->
    use f = guidedFixture ()
    use model = V2TinyModel.Load f
    let cond = Conditioning(randomText 31L, torch.zeros(1L, 4L, 8L, 8L))
    let stepper = SampleStep(spaced 1.0, model, cond)
    use s0 = stepper.Start(torch.zeros(1L, 4L, 8L, 8L), 3, new SeededNoise(32L))
    let p0 = stepper.Predict s0
    let s1 = stepper.Step(s0, p0)
    s1.Step |> should equal 1
    (fun () -> stepper.Predict s0 |> ignore) |> should throw typeof<InvalidOperationException>
    (fun () -> stepper.Step(s1, p0) |> ignore) |> should throw typeof<ArgumentException>

// ---------------------------------------------------------------- memory

[<Fact>]
let ``30 guided sampling steps with the tiny model keep the number of live tensors flat`` () = oneThread <| fun () ->
    use f = guidedFixture ()
    use model = V2TinyModel.Load f
    let restored = randomImage 41L 64L 64L
    let cond = Conditioning(randomText 42L, Encode(model).Image restored)
    let stepper = SampleStep(spaced 1.0, model, cond)
    // rgb space: every step back-propagates through the VAE decoder (autograd graphs must not outlive the step)
    let guide = GuideStage.For(model, WeightedMseGuidance(Scale = 0.5), restored)
    let xT = (new SeededNoise(44L)).Next(torch.zeros(1L, 4L, 8L, 8L))
    let live () = DisposeScopeManager.Statistics.ThreadTotalLiveCount
    let before = live ()
    let perStep = ResizeArray<int64>()
    let z =
        use state = stepper.Start(xT, 30, new SeededNoise(45L))
        SamplingLoop.Run(stepper, state, guide, fun i -> perStep.Add(live ()); i.GuidanceApplied)
    perStep.Count |> should equal 30
    // the same count at the same point of every step (the observer runs inside the step's dispose scope); at step 0
    // the run's copy of x_T is also the current z_t, from step 1 on z_t is a tensor of its own: one more …
    let steady = perStep |> Seq.skip 1 |> Seq.distinct |> List.ofSeq
    Assert.True(steady.Length = 1 && perStep.[0] = steady.Head - 1L, sprintf "live tensors per step: %A, before %d" (List.ofSeq perStep) before)
    // … and after the run only its result is left
    live () - before |> should equal 1L
    z.Dispose()
    live () |> should equal before

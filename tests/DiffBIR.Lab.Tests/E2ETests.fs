/// End-to-end restoration: the official pipelines (HEAD and v2.0.0) against their fixtures, the presets, and the
/// rules by which tiling switches itself off.
module DiffBIR.Lab.Tests.E2ETests

open System
open System.Diagnostics
open System.IO
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Pipeline
open DiffBIR.Lab.Tests.TestSupport

/// A 32×32 test image with structure (gradients and a square), uint8 [1, 32, 32, 3].
let private testImage () =
    let y = torch.arange(32L).to_type(torch.ScalarType.Float32).view(32L, 1L).expand(32L, 32L)
    let x = torch.arange(32L).to_type(torch.ScalarType.Float32).view(1L, 32L).expand(32L, 32L)
    let square = ((y.gt(torch.tensor 8.0f)).logical_and(y.lt(torch.tensor 20.0f)).logical_and(x.gt(torch.tensor 10.0f)).logical_and(x.lt(torch.tensor 24.0f))).to_type(torch.ScalarType.Float32)
    torch.stack([| y * 8.0f; x * 8.0f; square * 255.0f |], 2).to_type(torch.ScalarType.Byte).unsqueeze(0L)

/// The tiny preset for a task; its only file is the BPE vocabulary, taken from the fixtures folder.
let private tiny task = Presets.Build("tiny-random", task, fixturesDir)

// The e2e_bsr_v2 and v2.0.0/pipeline fixtures (untiled and tiled BSRNet pipelines, the paper-version pipelines with
// guidance) run once, through ParityTests' per-fixture theory ("fixture matches the official code"): 2–4 minutes of
// CPU each on 2 busy cores, so they are not repeated here.

[<Fact>]
let ``the tiny preset restores a 32×32 image end to end, deterministically for a seed, marked as not a trained model`` () =
    use p = tiny "sr"
    use lq = testImage ()
    let o = PipelineOptions(Steps = 2, Seed = 7L)
    let sw = Stopwatch.StartNew()
    use a = p.Restore(lq, o)
    printfn "tiny restore: %.1f s" sw.Elapsed.TotalSeconds
    sw.Elapsed.TotalSeconds |> should be (lessThan 60.0)
    use b = p.Restore(lq, o)
    a.NotATrainedModel |> should be True
    a.Image.shape |> should equal [| 1L; 128L; 128L; 3L |]
    a.Image.dtype |> should equal torch.ScalarType.Byte
    a.Stage1.shape |> should equal [| 1L; 3L; 128L; 128L |]
    a.Image.equal(b.Image).all().item<bool>() |> should be True
    use c = p.Restore(lq, PipelineOptions(Steps = 2, Seed = 8L))
    c.Z.equal(a.Z).all().item<bool>() |> should be False

[<Fact>]
/// docs/tiny-preset.md, the edm_heun outlier: on the official σ schedule (σ₀ = 10⁴; buffers checked by the sampler
/// fixtures) Heun's first step multiplies the change of x̂₀ between its two model calls by (σ₁ − σ₀)/(2σ₁), −276 at
/// 10 steps with v2.1 (σ₁ = 18.13). A run records it in its notes when it is over 100 in size; other samplers do not.
let ``an edm_heun run with a first-step factor over 100 says so in its notes, naming the factor`` () =
    let heun = DiffBIR.Lab.Sampling.EdmHeun(DiffBIR.Lab.Diffusion.NoiseSchedule.V2_1)
    let struct (f10, s0, s1) = heun.FirstStepFactor 10
    s0 |> should (equalWithin 1e-3) 1e4
    s1 |> should (equalWithin 0.01) 18.13
    f10 |> should (equalWithin 1.0) -275.3
    let struct (f200, _, _) = heun.FirstStepFactor 200
    abs f200 |> should be (lessThan 100.0)
    heun.FirstStepNote 200 |> should equal null
    use p = tiny "sr"
    use lq = testImage ()
    use r = p.Restore(lq, PipelineOptions(Steps = 2, Seed = 7L, Sampler = "edm_heun"))
    let notes = r.Notes |> Seq.filter (fun n -> n.Contains "edm_heun") |> List.ofSeq
    notes |> should haveLength 1
    let struct (f2, _, _) = DiffBIR.Lab.Sampling.EdmHeun(p.Pipeline.Schedule).FirstStepFactor 2
    notes.Head |> should haveSubstring (sprintf "by %.0f;" f2)
    use e = p.Restore(lq, PipelineOptions(Steps = 2, Seed = 7L, Sampler = "edm_euler"))
    e.Notes |> Seq.exists (fun n -> n.Contains "edm_heun") |> should be False

[<Fact>]
let ``the observer sees every stage in order`` () =
    use p = tiny "sr"
    use lq = testImage ()
    let stages = ResizeArray<string>()
    p.Pipeline.Observer <- Action<PipelineEvent>(fun e -> stages.Add e.Stage)
    let mutable steps = 0
    p.Pipeline.StepObserver <- Func<DiffBIR.Lab.Sampling.StepInfo, bool>(fun _ -> steps <- steps + 1; true)
    use _r = p.Restore(lq, PipelineOptions(Steps = 2, Seed = 1L))
    List.ofSeq stages |> should equal [ "stage1"; "c_txt"; "uc_txt"; "c_img"; "z"; "decoded"; "image" ]
    steps |> should equal 2

/// Official cast_dtype: UNet and ControlNet blocks in half / bfloat16 (GroupNorm float32); the rest stays float32
/// here (no autocast in TorchSharp). With random weights the latents are huge, so only finiteness and shape are checked.
[<Theory>]
[<InlineData("Bf16")>]
[<InlineData("Fp16")>]
let ``reduced precision casts the diffusion networks and still restores`` (precision: string) =
    let prec = if precision = "Bf16" then Precision.Bf16 else Precision.Fp16
    use p = Presets.Build("tiny-random", "sr", fixturesDir, BuildOptions(Precision = prec))
    let dtype = if precision = "Bf16" then torch.ScalarType.BFloat16 else torch.ScalarType.Float16
    p.Pipeline.Cldm.unet.parameters() |> Seq.exists (fun t -> t.dtype = dtype) |> should be True
    p.Pipeline.Cldm.controlnet.parameters() |> Seq.exists (fun t -> t.dtype = dtype) |> should be True
    p.Pipeline.Cldm.vae.parameters() |> Seq.forall (fun t -> t.dtype = torch.ScalarType.Float32) |> should be True
    use lq = testImage ()
    use r = p.Restore(lq, PipelineOptions(Steps = 2, Seed = 1L))
    r.Image.shape |> should equal [| 1L; 128L; 128L; 3L |]
    r.Z.isfinite().all().item<bool>() |> should be True

/// HEAD never applies restoration guidance (dead code); the lab's option applies it as v2.0.0 did.
[<Fact>]
let ``restoration guidance is off by default, as at HEAD, and moves the latent when switched on`` () =
    use p = tiny "sr"
    use lq = testImage ()
    use off = p.Restore(lq, PipelineOptions(Steps = 2, Seed = 5L))
    let g = DiffBIR.Lab.Guidance.WeightedMseGuidance(Scale = 0.5, Space = DiffBIR.Lab.Guidance.GuidanceSpace.Rgb)
    let applied = ResizeArray<bool>()
    p.Pipeline.StepObserver <- Func<DiffBIR.Lab.Sampling.StepInfo, bool>(fun s -> applied.Add s.GuidanceApplied; true)
    use on = p.Restore(lq, PipelineOptions(Steps = 2, Seed = 5L, Guidance = g))
    List.ofSeq applied |> should equal [ true; true ]
    on.Z.equal(off.Z).all().item<bool>() |> should be False

[<Fact>]
let ``every preset names its checkpoints, schedule and cleaner per task`` () =
    Presets.V2.Cleaners.[RestorationTask.Sr].Kind |> should equal CleanerKind.BSRNet
    Presets.V2.Cleaners.[RestorationTask.Denoise].Kind |> should equal CleanerKind.SCUNet
    Presets.V2_1.Schedule.ZeroTerminalSnr |> should be True
    Presets.V2_1.Parameterization |> should equal DiffBIR.Lab.Diffusion.Parameterization.V
    Presets.V1.ControlNetIds.[RestorationTask.Face] |> should equal "v1_face"
    Presets.V2.PreUpscale RestorationTask.Sr |> should be False
    Presets.V2_1.PreUpscale RestorationTask.Sr |> should be True
    Presets.TinyRandom.Defaults.Steps |> should equal 2
    for p in Presets.All do
        p.Defaults.Sampler |> should equal (if p.Name = "tiny" then "ddim" else "edm_dpm++_3m_sde")
        // the trained tiny model has no text conditioning: empty prompts, CFG 1
        p.Defaults.CfgScale |> should equal (if p.Name = "tiny" then 1.0 else 6.0)
    // the manifest knows every checkpoint id the official presets name
    let m = DiffBIR.Lab.Weights.WeightsManifest.Load(Path.Combine(repoRoot, "weights", "manifest.json"))
    for p in [ Presets.V1; Presets.V2; Presets.V2_1 ] do
        for t in [ RestorationTask.Sr; RestorationTask.Face; RestorationTask.Denoise ] do
            m.[p.SdCheckpointId].File |> should not' (be EmptyString)
            m.[p.ControlNetIds.[t]].File |> should not' (be EmptyString)
            m.[p.Cleaners.[t].CheckpointId].File |> should not' (be EmptyString)

[<Fact>]
let ``missing weights raise an error naming every file and the fetch command`` () =
    use dir = new TempDir()
    let ex = Assert.Throws<MissingWeightsException>(fun () -> Presets.Build("v2", "sr", dir.Path) |> ignore)
    for f in [ "v2-1_512-ema-pruned.ckpt"; "v2.pth"; "BSRNet.pth"; "bpe_simple_vocab_16e6.txt.gz" ] do
        ex.Message |> should haveSubstring f
        ex.MissingFiles |> should contain f
    ex.Message |> should haveSubstring "diffbir-lab weights fetch v2"
    let ex21 = Assert.Throws<MissingWeightsException>(fun () -> Presets.Build("v2.1", "face", dir.Path) |> ignore)
    ex21.Message |> should haveSubstring "face_swinir_v1.ckpt"
    ex21.Message |> should haveSubstring "diffbir-lab weights fetch v2.1"
    // tiny-random needs no file at all: without the vocabulary its random-weight CLIP gets the byte-level tokenizer
    use tinyWithoutVocab = Presets.Build("tiny-random", "sr", dir.Path)
    tinyWithoutVocab.CheckpointPaths |> should be Empty
    tinyWithoutVocab.Pipeline.NotATrainedModel |> should be True

/// The official code prints "the input size is tiny and unnecessary to tile" and runs untiled when the input is
/// smaller than a tile: the result must then be identical to the untiled run.
[<Fact>]
let ``tiling switches itself off when the input is smaller than a tile`` () =
    use p = tiny "sr"
    use lq = testImage ()
    let o = PipelineOptions(Steps = 2, Seed = 3L)
    use plain = p.Restore(lq, o)
    let tiled =
        PipelineOptions(Steps = 2, Seed = 3L, CleanerTiled = true, CleanerTileSize = 64, CleanerTileStride = 32, VaeEncoderTiled = true, VaeEncoderTileSize = 1024,
                        VaeDecoderTiled = true, VaeDecoderTileSize = 1024, CldmTiled = true, CldmTileSize = 1024, CldmTileStride = 512)
    use t = p.Restore(lq, tiled)
    t.Notes |> Seq.length |> should equal 4
    t.Notes |> Seq.iter (fun n -> n |> should haveSubstring "unnecessary to tile")
    t.Image.equal(plain.Image).all().item<bool>() |> should be True
    // the tiled VAE's own rule: no tiles when max(H, W) ≤ 2·pad + tile
    let vae = new DiffBIR.Lab.Models.Vae.TiledVae(p.Pipeline.Cldm.vae, false, 256)
    vae.WillTile(320L, 320L) |> should be False
    vae.WillTile(320L, 328L) |> should be True

[<Fact>]
let ``Pillow's bicubic pre-upscale keeps flat images flat and has the loop's size`` () =
    use flat = (torch.ones([| 1L; 5L; 7L; 3L |]) * 77.0f).to_type(torch.ScalarType.Byte)
    use up = PilResize.Upscale(flat, 4.0)
    up.shape |> should equal [| 1L; 20L; 28L; 3L |]
    up.eq(torch.tensor(77uy)).all().item<bool>() |> should be True
    use same = PilResize.Resize(flat, 5, 7)
    same.equal(flat).all().item<bool>() |> should be True

/// Values written by Pillow 9.4 (Debian python3-pil): a random 7×5 RGB image resized with Image.BICUBIC to 28×20
/// (the loops' ×4 pre-upscale), 3×2 (shrinking: widened support) and 10×13 (mixed).
[<Fact>]
let ``our bicubic pre-upscale equals Pillow's byte for byte`` () =
    let src = "grcO7n8aUDm+8H7CNH8GbtCPXcdRJEfjQEMAAmtuVFWUoGVoXWTEmAu41FRKhyGpmgGtIZ61nPahXvbxWh2DC7fOCda7wATnF1xkPH3ssLWA7De8lxLdLmquuUuujS+fopxaKEye91IY"
    let expected =
        [ 28, 20, "gMoAhscAl78AubMA4qMC/48R+HssyGJajEiOXza5YDbQkEnd0GTe/HzS9oa1v4R6dn83OH8FJIoAMqAgT71UatV/ceCKbOJ5Yt9hWdxMVd1CU9w+esMBgcABkbkEsa0E2Z4H9YsR7nkqv2FWhkmKWjm0WzjLikvYyGPa8nrP7oOzu4J7d346PX0KKogEN54lUblYac+CcNmNbNl9Y9ZnXNJSWdFJV9BEbrMhdLEgg6oeoKAWxJIP3oIQ13IkrF9Ndkx/Tj+pUD/Ae07NtGLQ3XXH3H2us3x7enlBSXkWOYIRQZYxVq5haMGJbsmUbMaGaL9yZLlfYbdXYbZTU5ZiWJRdZY9Sfog5nH0dsXIKrGgUhl44V1VpNU6TN06rXVe5kGG+uGu5vm+lpW98gG1MYG8pU3YnVYVFXZdwZqSVaqegbqCXcJWHcox5c4hydIZwNHKwOHGnQW6QVGlla2Mwe10GdlsDV1wgMl5PF195GmCROWCfZF+niF+nll+bk2B+iGFbfGNDdWdEbXJfZ32EY4KlZX+wb3GsemGihFSYiE2UikqTIFHvIlHjKE/ENU2LQ0pETEkISEwAMVcSFmI8A2plBmt8HGaKO12UWVeXblWSf1eBjVxrlWBdlGJihWd6cGyaYWq2YWDAb0u/gTS5kSGzmBewnBOwLkL3L0LrMkHONz6XPTxVPzobOz8NK0oeGVhBDGJjDGV3GGOFKl2PPlmVVFuTcGGIjWl4oW9wpHJ3kXWOdXWsX3DFXWLNa0XKfyXCkAy7mAC3mwC2ZUHGZEC/Yj2tXzeLWjBjVCtATiw4RDNEOj1bMUdzLU6CKleOKmCYMWmfQnOeY4GTiY6FpZh+qZ2HlZ6fd52/XpjXWITcYVzRcDC/fQ6wgwCohQCmqEiApUaAnkB9kjd3gypwdSBsbRtvaRl2ZxyAYyWLWTCUR0eeNGKnKnytNZKrV6eggrmSoseLqNCUldGvd8/QXszoVbLpV3/TX0e2ZhudaAORagCM11NK0lBOyUlYtj5ooC9+jCCThBaehwuijgWijwijghWnYjesP2KyJ4q1K6mzS8OpeNidmuqYovWhkve7ePbbYfXwV9ntVJ3RVl2tWCmPWQ5/WQJ502RCzmFIxVtWsFFumUSNhTapgCi4jRO7ngG5qAC2mga1cyy0RVyyI4qwIauuPcaraNuni+yolfmxjP7Fe//bav/pZOXkYqjJYmapYzGOYxWBYwh8m4JimIBokX1ygHqFbnSdYGm0ZVfBfzTInxHLswDKqQDEfiG3SFCmHn6bFZyaKrGkTcGzbM/BfN3JgefNgPDQgPbOgt3IhKa6hmiqhzaeiByXiRCVUaKUT6KXS6KbQKejN6utMaa5QI/CaV/OlynZtwPcsQDThRe4TEKXHGuADYSBGJKbMJy9S6XZX7Lfc8PShtS+l96ro8ylrJynsWastTqwtySyuhq0F7XCF7XBFbrADsa9C9K6CtO6IbvAVYLPj0DguA3ntwDcjRK3UjaLIFltDGxuEHWRH3vBNYLmSo7rZ6LSh7etpcOPubaIypCW1GOp3D+54SzB5STFD6nZDqrXDbHTBMLLANTCANu7FsW+To/NjE3fuRjnvAfblhS2XzCKL0xrG1xrG2WMJ225OHXcSoDfY5LGgKKinKuEs6F9zIOJ32Cb70Or+DSy+y62NXrhM33fLobZHprQEa/DCL26HLC5T4fEilXRtyrXvhrOoB+zdC6STUB6Pk12QF2ISm2iVnu3X4S5ZYutbo6aeo2IkIOAs3B/1VqA8UiC/z+D/zuDaUPiZUffW1LaRWfPLH/CG5K2KJCzU3i4iVnAsz3DvS++qiywii6dbjaOZEKGaVmFdHOIfYeLeo6NaomQWX2TU3CSZGeKkV14w1Rk7E1U/0hM/0dIlRbijxvfgifZZT3ORFfALG+zMnSuV2uuiFuxsEuzvECxsTetmy+miC+fgzqUi1eEl3lznJNnkJdpb4l5SXGPMlubQFGTdk5ztE9N51Av/08f/1AYqwDjpATglRHadSjOT0TANF6yNmerWGWpiF2qrlOrvEqqtTyrpS+rlyqnkzWanVWCqXxorJhVm5tWcYdtQWmMIk6fLkSWaEZvrUxB5lIb/1QI/1UAtADkrADhnQfaex/PUzvANlaxOGKqWWOnh16nrlenvE6otz6rqS+tnSirmzKdpVSCsXxjs5lNoJxNcYZoPWWKGkihJj6XYkJuqks75lMT/1YA/1gA"
          3, 2, "cFpfanCNcYiWXmC5amSlk3qV"
          10, 13, "hMYA1KcB4m5CWTTB1GbcxYSBJoQAXsltaeB0VtlCdrUYv5oOy2o5TTy1vmXSu36BNn8KX7x2a8p+X71SS4h3g3cuimAcJ1OUhmG2ommBYG0tYpSKcIyae3R9IlTgQk1XQVICA2pwQ12WgFeCk2BbZ22ndEe7mByuQkDeRjdsOTsgGFpwKl6TZ2uNqYB6aYLBbUDKkQCyo0WChy5yaRpvXyiNMmWnVKOhqsuOaczdWWzKagGR2VdEqjt8iBOwnACtP2W0QcWsnfijbv/oWJHDWhB8loFocniWb0jGtADKQ1WkJq6jd9bIgfLOhpO1ihqYKrCxHMO1QpLHvADjST6MEX+RSpbqlcqlwoeh0ie+EabZAczFL6zEwBHlWzKHH2OIRnzfjKWR0XeN+jWvVFngKInGOI64vDDKfy+XW1iFcomcX36Sq192/0VelhXgUkrEQ26st0qxnC+nj1SFmppiOGKYhUxm/1AYrADiXzTERmWotVSopy6tolGEqZ9MKVWYeUVf/1YA" ]
    let bytes : byte[] = Convert.FromBase64String src
    use flat = torch.tensor(bytes)
    use img = flat.reshape(1L, 5L, 7L, 3L)
    for (w, h, b64) in expected do
        use ours = PilResize.Resize(img, h, w)
        ours.data<byte>().ToArray() |> should equal (Convert.FromBase64String b64)

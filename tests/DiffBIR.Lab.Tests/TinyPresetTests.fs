/// The trained tiny DiffBIR: the procedural image family, the recipe's determinism, and the committed weights
/// (weights/tiny) — loaded, checked against recipe.json, and better than random weights. Torch's thread count is
/// changed by the recipe, so these run in the non-parallel collection.
[<Xunit.Collection("torch-threads")>]
module DiffBIR.Lab.Tests.TinyPresetTests

open System
open System.IO
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab
open DiffBIR.Lab.Checkpoints
open DiffBIR.Lab.Data
open DiffBIR.Lab.IO
open DiffBIR.Lab.Metrics
open DiffBIR.Lab.Pipeline
open DiffBIR.Lab.Training
open DiffBIR.Lab.Tests.TestSupport

let private withThreads n (f: unit -> 'a) =
    let before = torch.get_num_threads ()
    torch.set_num_threads n
    try f () finally torch.set_num_threads before

let private maxAbs (a: torch.Tensor) (b: torch.Tensor) = (a - b).abs().max().item<float32>()

[<Fact>]
let ``procedural images are a deterministic function of (seed, index), in [0, 1], different per index and seed`` () =
    use a = ProceduralImages.Generate(1L, 5L, 64)
    use b = ProceduralImages.Generate(1L, 5L, 64)
    use c = ProceduralImages.Generate(1L, 6L, 64)
    use d = ProceduralImages.Generate(2L, 5L, 64)
    a.shape |> should equal [| 3L; 64L; 64L |]
    maxAbs a b |> should equal 0.0f
    (a - c).abs().mean().item<float32>() |> should be (greaterThan 0.02f)
    (a - d).abs().mean().item<float32>() |> should be (greaterThan 0.02f)
    a.min().item<float32>() |> should be (greaterThanOrEqualTo 0.0f)
    a.max().item<float32>() |> should be (lessThanOrEqualTo 1.0f)
    use u8 = ProceduralImages.GenerateUInt8(1L, 5L, 64)
    u8.shape |> should equal [| 64L; 64L; 3L |]
    u8.dtype |> should equal torch.ScalarType.Byte

[<Fact>]
let ``procedural images have structure: edges and colour, not flat fields`` () =
    for i in 0L .. 11L do
        use x = ProceduralImages.Generate(2026L, i, 128).unsqueeze(0)
        // every image has detail (mean |Laplacian| of luma) and contrast
        TinyRecipeEvaluation.Detail x |> should be (greaterThan 1.0)
        x.std().item<float32>() |> should be (greaterThan 0.03f)

[<Fact>]
let ``two short recipe runs with one seed and thread count write byte-identical weights; another seed differs`` () =
    withThreads 1 <| fun () ->
        use d1 = new TempDir()
        use d2 = new TempDir()
        use d3 = new TempDir()
        let o = TinyRecipeOptions.Short(2, 4)
        let r1 = TinyRecipe.Train(d1.Path, o)
        let r2 = TinyRecipe.Train(d2.Path, o)
        let r3 = TinyRecipe.Train(d3.Path, TinyRecipeOptions.Short(2, 4, 7L))
        for f in TinyRecipe.WeightFiles do
            File.ReadAllBytes(d1.File f) |> should equal (File.ReadAllBytes(d2.File f))
            r1.Sha256.[f] |> should equal (TinyRecipe.Sha256(d1.File f))
        r3.Sha256.["unet.safetensors"] |> should not' (equal r1.Sha256.["unet.safetensors"])
        File.Exists(d1.File "recipe.json") |> should be True
        // the written folder is a working tiny preset
        use p = Presets.Build(Presets.Tiny, RestorationTask.Sr, d1.Path, BuildOptions(Upscale = 1.0, TinyWeightsDir = d1.Path))
        p.Pipeline.NotATrainedModel |> should be False

/// A held-out procedural image (never used in training) and its Eq. 2 LQ version, as the recipe makes them.
let private heldOut (k: int64) =
    let index = TinyTrainingData.HeldOutStart + k
    let hq = ProceduralImages.Generate(2026L, index, 128)
    let struct (lq, _, _) = TinyTrainingData.DegradeWithSize(hq, 2026L, index)
    hq.unsqueeze(0), lq.unsqueeze(0)

let private psnr (a: torch.Tensor) (b: torch.Tensor) = ImageMetrics.Psnr(a, b).mean().item<float>()

[<Fact>]
/// Measured with the committed weights (2026-12-01 evening): held-out 0 and 1 give 22.23 / 28.99 dB trained, 22.04 /
/// 25.95 dB as 8×8 block means (the codec the recipe starts the VAE from), 9.96 / 9.19 dB random. The weights before
/// the block-mean start gave 15.1 dB on average, below the block means: this test would have failed them.
let ``the committed tiny weights match recipe.json, load as a trained model, and their VAE beats the 8x8 block means it starts from on unseen images`` () =
    withThreads 1 <| fun () ->
        use trained = Presets.Build("tiny", "sr", "no-weights-needed", BuildOptions(Upscale = 1.0))
        trained.Pipeline.NotATrainedModel |> should be False
        [ for p in trained.CheckpointPaths -> Path.GetFileName p ] |> should equal (List.ofArray TinyRecipe.WeightFiles @ [ "recipe.json" ])
        use random = Presets.Build("tiny-random", "sr", "no-weights-needed")
        use _ = torch.no_grad ()
        let roundTrip (cldm: DiffBIR.Lab.Models.ControlLDM) (x: torch.Tensor) =
            ((cldm.VaeDecode(cldm.VaeEncode(x * 2.0f - 1.0f)) + 1.0f) / 2.0f).clamp(torch.tensor 0.0f, torch.tensor 1.0f)
        for k in 0L .. 1L do
            let hq, _ = heldOut k
            let pt = psnr (roundTrip trained.Pipeline.Cldm hq) hq
            let pr = psnr (roundTrip random.Pipeline.Cldm hq) hq
            // The 8×8 block-mean codec the recipe starts the VAE from, computed here with torch's pooling.
            use means = torch.nn.functional.avg_pool2d(hq, 8L)
            use blocks = torch.nn.functional.interpolate(means, scale_factor = [| 8.0; 8.0 |], mode = torch.InterpolationMode.Nearest)
            let pb = psnr blocks hq
            printfn "held-out %d: VAE round trip PSNR trained %.2f dB, random %.2f dB, 8x8 block means %.2f dB" k pt pr pb
            Assert.True(pt > pb, sprintf "trained VAE round trip %.2f dB is not above the 8x8 block means' %.2f dB (random %.2f dB)" pt pb pr)
            Assert.True(pr < 10.5, sprintf "random VAE round trip %.2f dB (trained %.2f dB)" pr pt)

[<Fact>]
/// The committed weights (4 DDIM steps, held-out 0 and 1): −0.59 dB vs the LQ input trained (the weights before
/// 2026-12-01 night: −2.82 dB), −12.75 dB random. At s = 0 the trained tiny pipeline does NOT beat the degraded input
/// (docs/tiny-preset.md); with guidance it does (next test).
let ``the trained tiny pipeline stays within 1.5 dB of the degraded input on unseen Eq. 2 images, random weights lose over 8 dB`` () =
    withThreads 1 <| fun () ->
        use trained = Presets.Build("tiny", "sr", "no-weights-needed", BuildOptions(Upscale = 1.0))
        use random = Presets.Build("tiny-random", "sr", "no-weights-needed", BuildOptions(Upscale = 1.0))
        let restore (p: PresetPipeline) (lq: torch.Tensor) =
            // the tiny model's own defaults (empty prompts, CFG 1), 4 DDIM steps
            use r = p.Restore(ImageIO.ToUInt8(lq, Quantization.Round), PipelineOptions(Steps = 4, Sampler = "ddim", PosPrompt = "", NegPrompt = "", CfgScale = 1.0, Seed = 231L))
            ImageIO.FromUInt8 r.Image
        let mutable gain, gainRandom = 0.0, 0.0
        for k in 0L .. 1L do
            let hq, lq = heldOut k
            let base' = psnr lq hq
            gain <- gain + (psnr (restore trained lq) hq - base') / 2.0
            gainRandom <- gainRandom + (psnr (restore random lq) hq - base') / 2.0
        printfn "PSNR gain over the LQ input: trained %.2f dB, random %.2f dB" gain gainRandom
        Assert.True(gain > -1.5, sprintf "trained gain %.2f dB, random %.2f dB" gain gainRandom)
        Assert.True(gainRandom < -8.0, sprintf "random gain %.2f dB, trained %.2f dB" gainRandom gain)

[<Fact>]
/// The acceptance measurement of docs/tiny-preset.md (held-out 0–7, DDIM 10, seed 231): LQ 23.47, bicubic 23.47,
/// stage 2 at s = 0 22.30, at s = 1 23.68 dB. Guidance is the lab's fidelity knob; at s = 0 stage 2 is still below
/// the LQ (the weights before 2026-12-01 night: 19.04 dB at s = 0, 23.67 dB at s = 1 — guidance alone carried them).
/// A pin of these 8 images, not a general claim: on held-out 0–31 s = 1 gives 23.19 dB against the LQ's 23.59.
let ``on held-out images 0-7 restoration guidance at s = 1 lifts the trained tiny pipeline over 1 dB and above the degraded input and bicubic`` () =
    withThreads 1 <| fun () ->
        use trained = Presets.Build("tiny", "sr", "no-weights-needed", BuildOptions(Upscale = 1.0))
        let restore (lq: torch.Tensor) (s: float) =
            let g = if s > 0.0 then DiffBIR.Lab.Guidance.MseGuidance(Scale = s) :> DiffBIR.Lab.Guidance.RestorationGuidance else null
            use r = trained.Restore(ImageIO.ToUInt8(lq, Quantization.Round), PipelineOptions(Steps = 10, Sampler = "ddim", PosPrompt = "", NegPrompt = "", CfgScale = 1.0, Seed = 231L, Guidance = g))
            ImageIO.FromUInt8 r.Image
        let mutable lqP, bicP, s0, s1 = 0.0, 0.0, 0.0, 0.0
        for k in 0L .. 7L do
            use _ = torch.NewDisposeScope()
            let index = TinyTrainingData.HeldOutStart + k
            let hq = ProceduralImages.Generate(2026L, index, 128).unsqueeze 0L
            let struct (lq, sh, sw) = TinyTrainingData.DegradeWithSize(hq.squeeze 0L, 2026L, index)
            let lq = ImageIO.FromUInt8(ImageIO.ToUInt8(lq.unsqueeze 0L, Quantization.Round))
            use bic = ImageOps.ResizeBicubic(DiffBIR.Lab.Degradation.FirstOrderDegradation.ResizeBilinear(lq, sh, sw), 128, 128).clamp(torch.tensor 0.0f, torch.tensor 1.0f)
            lqP <- lqP + psnr lq hq / 8.0
            bicP <- bicP + psnr bic hq / 8.0
            s0 <- s0 + psnr (restore lq 0.0) hq / 8.0
            s1 <- s1 + psnr (restore lq 1.0) hq / 8.0
        printfn "PSNR: LQ %.2f, bicubic %.2f, pipeline s = 0 %.2f, s = 1 %.2f dB" lqP bicP s0 s1
        Assert.True(s1 > lqP && s1 > bicP, sprintf "guided pipeline %.2f dB vs LQ %.2f / bicubic %.2f dB" s1 lqP bicP)
        Assert.True(s1 > s0 + 1.0, sprintf "guidance moved PSNR %.2f → %.2f dB only" s0 s1)

[<Fact>]
let ``a damaged tiny recipe.json (bad JSON, or a wrong type in the recorded architecture) is refused naming the file and the part`` () =
    use dir = new TempDir()
    let src = Presets.FindTinyWeights()
    for f in Directory.GetFiles src do File.Copy(f, dir.File(Path.GetFileName f))
    let recipe = Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(dir.File "recipe.json"))
    recipe.["model"].["cldm"].["vae_cfg"].["ddconfig"].["norm_out"] <- Text.Json.Nodes.JsonValue.Create("yes")
    File.WriteAllText(dir.File "recipe.json", recipe.ToJsonString())
    let build () = Presets.Build(Presets.Tiny, RestorationTask.Sr, "x", BuildOptions(TinyWeightsDir = dir.Path)) |> ignore
    let ex = Assert.Throws<CheckpointException>(build)
    ex.Message |> should haveSubstring "recipe.json"
    ex.Message |> should haveSubstring "model.cldm"
    File.WriteAllText(dir.File "recipe.json", "{bad")
    (Assert.Throws<CheckpointException>(build)).Message |> should haveSubstring "not valid JSON"

[<Fact>]
let ``the variants read the committed recipe (stage 2 and its decay), and refuse a damaged one naming the file`` () =
    use dir = new TempDir()
    File.Copy(Path.Combine(Presets.FindTinyWeights(), "recipe.json"), dir.File "recipe.json")
    let struct (_, seed, _, _, _, schedule, stage2, decay, _) = TinyVariants.ReadRecipe(dir.File "recipe.json")
    seed |> should equal 2026L
    schedule |> should equal "v2.1"
    stage2 |> should equal (TinyRecipeOptions().Stage2)
    decay |> should equal (TinyRecipeOptions().DecayFraction)
    let recipe = Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(dir.File "recipe.json"))
    recipe.["decay_fraction"] <- Text.Json.Nodes.JsonValue.Create("x")
    File.WriteAllText(dir.File "recipe.json", recipe.ToJsonString())
    let ex = Assert.Throws<CheckpointException>(fun () -> TinyVariants.ReadRecipe(dir.File "recipe.json") |> ignore)
    ex.Message |> should haveSubstring (dir.File "recipe.json")
    ex.Message |> should haveSubstring "damaged recipe"
    recipe.["decay_fraction"] <- Text.Json.Nodes.JsonValue.Create(1.5)
    File.WriteAllText(dir.File "recipe.json", recipe.ToJsonString())
    (Assert.Throws<CheckpointException>(fun () -> TinyVariants.ReadRecipe(dir.File "recipe.json") |> ignore)).Message |> should haveSubstring "decay_fraction"
    File.WriteAllText(dir.File "recipe.json", "{\"seed\": 1,")
    Assert.Throws<CheckpointException>(fun () -> TinyVariants.ReadRecipe(dir.File "recipe.json") |> ignore) |> ignore

[<Fact>]
let ``a damaged tiny weight file is refused with its name and both SHA-256 values`` () =
    use dir = new TempDir()
    let src = Presets.FindTinyWeights()
    for f in Directory.GetFiles src do File.Copy(f, dir.File(Path.GetFileName f))
    let bytes = File.ReadAllBytes(dir.File "unet.safetensors")
    bytes.[bytes.Length - 1] <- bytes.[bytes.Length - 1] ^^^ 1uy
    File.WriteAllBytes(dir.File "unet.safetensors", bytes)
    let ex = Assert.Throws<CheckpointException>(fun () -> Presets.Build(Presets.Tiny, RestorationTask.Sr, "x", BuildOptions(TinyWeightsDir = dir.Path)) |> ignore)
    ex.Message |> should haveSubstring "unet.safetensors"
    ex.Message |> should haveSubstring (TinyRecipe.Sha256(dir.File "unet.safetensors"))
    ex.Message |> should haveSubstring "train-tiny"

/// Feeds every GroupNorm of a VAE a field whose channels are constants 0, 1, 2, … and returns the largest output:
/// a norm whose groups hold one channel each maps it to 0 (the per-channel offset — an image's colour — is erased).
let private largestNormOutputOnChannelOffsets (vae: DiffBIR.Lab.Models.Vae.AutoencoderKL) =
    use _ = torch.no_grad ()
    [ for struct (_, m) in vae.named_modules () do
        match m with
        | :? TorchSharp.Modules.GroupNorm as g ->
            let c = g.weight.shape.[0]
            use x = torch.arange(c, dtype = torch.ScalarType.Float32).view(1L, c, 1L, 1L).expand(1L, c, 2L, 2L).contiguous()
            use y = g.forward x
            yield y.abs().max().item<float32>()
        | _ -> () ]

[<Fact>]
let ``norm_num_groups sets the VAE's GroupNorm groups: 32 (official) erases per-channel offsets at 32 channels, the tiny VAE's 8 keeps them`` () =
    let config groups =
        let json = Text.Json.Nodes.JsonNode.Parse(TinyRecipe.CldmJson).["vae_cfg"]
        let dd = json.["ddconfig"].AsObject()
        match groups with
        | Some g -> dd.["norm_num_groups"] <- Text.Json.Nodes.JsonValue.Create(g: int)
        | None -> dd.Remove "norm_num_groups" |> ignore
        DiffBIR.Lab.Models.Vae.VaeConfig.FromJson json
    (config None).DdConfig.NormGroups |> should equal 32
    (config (Some 8)).DdConfig.NormGroups |> should equal 8
    use official = new DiffBIR.Lab.Models.Vae.AutoencoderKL(config None)
    use tiny = new DiffBIR.Lab.Models.Vae.AutoencoderKL(config (Some 8))
    TinyRecipe.InitFromScratch(official, 1L)
    TinyRecipe.InitFromScratch(tiny, 1L)
    let o, t = largestNormOutputOnChannelOffsets official, largestNormOutputOnChannelOffsets tiny
    o.Length |> should equal t.Length
    o.Length |> should be (greaterThan 10)
    List.max o |> should be (lessThan 1e-3f)
    List.min t |> should be (greaterThan 0.5f)
    // the committed recipe's architecture is the 8-group one
    (TinyRecipe.CldmConfig 1.0).Vae.DdConfig.NormGroups |> should equal 8

[<Fact>]
let ``norm_out: false drops both last GroupNorms (keys and computation); the official default keeps them`` () =
    let config (normOut: bool option) =
        let json = Text.Json.Nodes.JsonNode.Parse(TinyRecipe.CldmJson).["vae_cfg"]
        let dd = json.["ddconfig"].AsObject()
        dd.Remove "norm_out" |> ignore
        normOut |> Option.iter (fun b -> dd.["norm_out"] <- Text.Json.Nodes.JsonValue.Create(b: bool))
        DiffBIR.Lab.Models.Vae.VaeConfig.FromJson json
    (config None).DdConfig.NormOut |> should be True
    (config (Some false)).DdConfig.NormOut |> should be False
    (TinyRecipe.CldmConfig 1.0).Vae.DdConfig.NormOut |> should be False
    use withNorm = new DiffBIR.Lab.Models.Vae.AutoencoderKL(config None)
    use without = new DiffBIR.Lab.Models.Vae.AutoencoderKL(config (Some false))
    let keys (m: DiffBIR.Lab.Models.Vae.AutoencoderKL) = m.state_dict().Keys |> Set.ofSeq
    Set.difference (keys withNorm) (keys without)
    |> should equal (set [ "encoder.norm_out.weight"; "encoder.norm_out.bias"; "decoder.norm_out.weight"; "decoder.norm_out.bias" ])
    Set.isSubset (keys without) (keys withNorm) |> should be True
    // The same weights otherwise: with norm_out the decoder's output changes when the whole latent is shifted by a
    // constant only through the norm; without it a constant shift reaches conv_out. Check that the two really differ.
    TinyRecipe.InitFromScratch(withNorm, 3L)
    use _ = torch.no_grad ()
    let sd = withNorm.state_dict()
    for KeyValue(k, v) in without.state_dict() do v.copy_(sd.[k]) |> ignore
    use z = torch.randn([| 1L; 4L; 4L; 4L |], generator = new torch.Generator(5UL))
    use a = withNorm.Decode z
    use b = without.Decode z
    (a - b).abs().max().item<float32>() |> should be (greaterThan 1e-3f)

[<Fact>]
/// The recipe's VAE starting point is the 8×8 block-mean codec: checked against avg_pool2d and nearest upsampling
/// computed here, on a procedural image with odd content (not on anything the init wrote).
let ``the tiny VAE starts as the 8×8 block-mean codec: mu = block means, decode = nearest upsampling, exactly`` () =
    withThreads 1 <| fun () ->
        use cldm = TinyRecipe.NewCldm 1.0
        TinyRecipe.InitFromScratch(cldm.vae, 9L)
        TinyRecipe.InitVaeAsBlockMeans cldm.vae
        use _ = torch.no_grad ()
        use x = ProceduralImages.Generate(4L, 17L, 48).unsqueeze(0) * 2.0f - 1.0f
        use post = cldm.vae.Encode x
        use means = torch.nn.functional.avg_pool2d(x, 8L)
        maxAbs (post.Mean.narrow(1L, 0L, 3L)) means |> should be (lessThan 1e-5f)
        // log σ² starts at −6 everywhere (σ ≈ 0.05)
        (post.LogVar + 6.0f).abs().max().item<float32>() |> should be (lessThan 1e-5f)
        use z = post.Mean.clone()
        z.narrow(1L, 3L, 1L).zero_() |> ignore   // the free channel has random encoder rows; the decoder ignores it at step 0
        use recon = cldm.vae.Decode z
        use up = torch.nn.functional.interpolate(means, scale_factor = [| 8.0; 8.0 |], mode = torch.InterpolationMode.Nearest)
        maxAbs recon up |> should be (lessThan 1e-5f)
        use recon2 = cldm.vae.Decode post.Mean
        maxAbs recon2 up |> should be (lessThan 1e-5f)
        // the official layout (norm_out present) cannot carry the codec: refused with the reason
        use official = new DiffBIR.Lab.Models.Vae.AutoencoderKL()
        (Assert.Throws<ArgumentException>(fun () -> TinyRecipe.InitVaeAsBlockMeans official)).Message |> should haveSubstring "norm_out"

[<Fact>]
let ``the learning-rate decay is constant, then falls linearly over the last fraction of the steps`` () =
    [ for s in 1 .. 10 -> TinyRecipe.DecayFactor(s, 10, 0.3) ] |> should equal [ 1.0; 1.0; 1.0; 1.0; 1.0; 1.0; 1.0; 0.75; 0.5; 0.25 ]
    [ for s in 1 .. 4 -> TinyRecipe.DecayFactor(s, 4, 0.0) ] |> should equal [ 1.0; 1.0; 1.0; 1.0 ]
    [ for s in 1 .. 3 -> TinyRecipe.DecayFactor(s, 3, 1.0) ] |> should equal [ 0.75; 0.5; 0.25 ]

[<Fact>]
let ``Table 1 in miniature: variants train on the recipe's stage-2 batches and draws (a retrained IRControlNet equals the recipe's), and each is measured`` () =
    withThreads 1 <| fun () ->
        use d = new TempDir()
        use out = new TempDir()
        TinyRecipe.Train(d.Path, TinyRecipeOptions.Short(2, 4)) |> ignore
        let json = out.File "variants.json"
        let r = TinyVariants.Run(d.Path, out.Path, json, TinyVariantsOptions(Variants = [| "irc"; "v5"; "v6" |], EvalImages = 1, RetrainIrc = true))
        let rows = r.["rows"].AsArray() |> Seq.toList
        [ for x in rows -> x.["variant"].ToString() ] |> should equal [ "irc"; "v5"; "v6" ]
        // same batches and draws as the recipe's stage 2: the retrained IRControlNet has the committed one's tensors
        // (the files differ only in their metadata: producer and variant)
        use retrained = Checkpoint.Load(out.File "controlnet_irc.safetensors")
        use recipe = Checkpoint.Load(d.File "controlnet.safetensors")
        retrained.Tensors.Count |> should equal recipe.Tensors.Count
        for KeyValue(k, t) in recipe.Tensors do
            (retrained.Tensors.[k] - t).abs().max().to_type(torch.ScalarType.Float32).item<float32>() |> should equal 0.0f
        for v in [ "v5"; "v6" ] do
            use ck = Checkpoint.Load(out.File (sprintf "controlnet_%s.safetensors" v))
            ck.Metadata.[TrainingCheckpoint.ControlModeKey] |> should equal v
        for x in rows do
            let psnr = float (x.["psnr"].ToString())
            psnr |> should be (greaterThan 3.0)
            psnr |> should be (lessThan 60.0)
            Double.IsFinite(float (x.["niqe_lab"].ToString())) |> should be True
        File.Exists json |> should be True
        // without RetrainIrc the irc row measures the recipe's own file
        let r2 = TinyVariants.Run(d.Path, out.Path, out.File "v2.json", TinyVariantsOptions(Variants = [| "irc" |], EvalImages = 1))
        r2.["rows"].[0].["sha256"].ToString() |> should equal (TinyRecipe.Sha256(d.File "controlnet.safetensors"))

/// The Stable Diffusion 2.1 UNet and DiffBIR's IRControlNet (official ControlledUnetModel / ControlNet), the two
/// lab variants of the control path, and the fp16 / bf16 casting of ControlLDM.cast_dtype.
module DiffBIR.Lab.Tests.UNetControlNetTests

open System
open System.Text.Json.Nodes
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Checkpoints
open DiffBIR.Lab.Parity
open DiffBIR.Lab.Models.StableDiffusion
open DiffBIR.Lab.Tests.TestSupport

let private log (s: string) =
    match TestContext.Current.TestOutputHelper with
    | null -> printfn "%s" s
    | o -> o.WriteLine s

/// max|a − e| / max|e| (the fixtures' max_rel), computed in float64.
let private maxRel (a: torch.Tensor) (e: torch.Tensor) =
    let a64 = a.to_type(torch.ScalarType.Float64)
    let e64 = e.to_type(torch.ScalarType.Float64)
    (a64 - e64).abs().max().item<float>() / e64.abs().max().item<float>()

let private maxAbs (a: torch.Tensor) (e: torch.Tensor) =
    (a.to_type(torch.ScalarType.Float64) - e.to_type(torch.ScalarType.Float64)).abs().max().item<float>()

/// The tiny ControlLDM of unet_controlnet.safetensors, loaded strictly from the fixture's weights.
type private Tiny =
    { Fixture: Fixture
      Unet: UNetModel
      ControlNet: ControlNet
      X: torch.Tensor
      T: torch.Tensor
      Context: torch.Tensor
      Hint: torch.Tensor }
    interface IDisposable with
        member this.Dispose() =
            this.Unet.Dispose()
            this.ControlNet.Dispose()
            this.Fixture.Dispose()

let private scales (fx: Fixture) (name: string) =
    fx.Config.["control_scales"].[name].AsArray() |> Seq.map (fun s -> s.GetValue<float>()) |> Array.ofSeq

/// mode = Add loads the official ControlNet strictly; the variants load it leniently (their extra convs stay zero).
let private loadTiny (mode: ControlMode) =
    let fx = Fixture.Load(fixture "unet_controlnet.safetensors")
    let unet = new UNetModel(UNetConfig.FromJson(fx.Config.["unet_cfg"]))
    let cn = new ControlNet(UNetConfig.FromJson(fx.Config.["controlnet_cfg"]), mode)
    StateDictLoader.Load(unet, fx.Weights("unet")) |> ignore
    StateDictLoader.Load(cn, fx.Weights("controlnet"), strict = (mode = ControlMode.Add)) |> ignore
    unet.AttentionMode <- AttentionMode.Vanilla
    cn.AttentionMode <- AttentionMode.Vanilla
    unet.eval ()
    cn.eval ()
    { Fixture = fx; Unet = unet; ControlNet = cn; X = fx.In "x"; T = fx.In "t"; Context = fx.In "context"; Hint = fx.In "hint" }

/// The ControlNet as it starts training: copied encoder, zero convs zero (the fixture's are random, non-zero).
let private zeroControlOutputs (cn: ControlNet) =
    use _ = torch.no_grad ()
    for p in Seq.append (cn.zero_convs.parameters ()) (cn.middle_block_out.parameters ()) do
        p.zero_ () |> ignore

let private eps (m: Tiny) (scaleName: string) =
    use c = m.ControlNet.forward(m.X, m.Hint, m.T, m.Context)
    use s = c.Scaled(scales m.Fixture scaleName)
    m.Unet.forward(m.X, m.T, m.Context, s)

// ---------------------------------------------------------------------------------------------------------------
// Parity with the official code

[<Fact>]
let ``ControlLDM forward matches the official code: controls, three control-scale sets and the plain UNet`` () =
    let report = assertParity "unet_controlnet.safetensors"
    for o in report.Outputs do
        log (sprintf "%-16s max_abs=%.3g max_rel=%.3g" o.Name o.MaxAbs o.MaxRel)
    report.Outputs.Count |> should equal 9

[<Fact>]
let ``full-size SD 2.1 UNet has the released keys, shapes and 865,910,724 parameters`` () =
    assertParity "schema/unet.json" |> ignore

[<Fact>]
let ``full-size IRControlNet has the released keys, shapes and 363,153,280 parameters`` () =
    assertParity "schema/controlnet.json" |> ignore

[<Fact>]
let ``SDPA attention (the official default on torch 2) agrees with the vanilla attention of the fixtures`` () =
    use m = loadTiny ControlMode.Add
    m.Unet.AttentionMode <- AttentionMode.Sdp
    m.ControlNet.AttentionMode <- AttentionMode.Sdp
    use _ = torch.no_grad ()
    use e = eps m "scale1"
    let rel = maxRel e (m.Fixture.Out "eps_scale1")
    log (sprintf "SDPA vs official vanilla: max_rel=%.3g" rel)
    rel |> should be (lessThan 1e-5)

[<Fact>]
let ``timestep embedding is float32 [cos(t·f), sin(t·f)] with f_i = exp(−ln(10000)·i/half)`` () =
    use t = torch.tensor ([| 0L; 7L; 999L |])
    use emb = SdNn.TimestepEmbedding(t, 8)
    emb.dtype |> should equal torch.ScalarType.Float32
    emb.shape |> should equal [| 3L; 8L |]
    // i = 0 has frequency 1: cos(t) in column 0, sin(t) in column half = 4.
    emb.[1L, 0L].item<float32>() |> float |> should (equalWithin 1e-6) (cos 7.0)
    emb.[1L, 4L].item<float32>() |> float |> should (equalWithin 1e-6) (sin 7.0)
    emb.[2L, 1L].item<float32>() |> float |> should (equalWithin 1e-4) (cos (999.0 * exp (-Math.Log 10000.0 / 4.0)))
    emb.[0L, 0L].item<float32>() |> should equal 1.0f

[<Fact>]
let ``all control scales 0 give the plain UNet exactly`` () =
    use m = loadTiny ControlMode.Add
    use _ = torch.no_grad ()
    use c = m.ControlNet.forward(m.X, m.Hint, m.T, m.Context)
    use s = c.Scaled(Array.zeroCreate 13)
    use e = m.Unet.forward(m.X, m.T, m.Context, s)
    use plain = m.Unet.forward(m.X, m.T, m.Context)
    maxAbs e plain |> should equal 0.0

[<Fact>]
let ``a strict load with a missing key fails and names the key`` () =
    use fx = Fixture.Load(fixture "unet_controlnet.safetensors")
    use cn = new ControlNet(UNetConfig.FromJson(fx.Config.["controlnet_cfg"]))
    let weights = fx.Weights("controlnet")
    weights.Remove("zero_convs.3.0.weight") |> should equal true
    let ex = Assert.Throws<StateDictMismatchException>(fun () -> StateDictLoader.Load(cn, weights) |> ignore)
    ex.Message |> should haveSubstring "zero_convs.3.0.weight"
    List.ofSeq ex.Report.Missing |> should equal [ "zero_convs.3.0.weight" ]

[<Fact>]
let ``decoder channels at each skip follow the released UNet's output blocks`` () =
    // output_blocks.j.0 is a ResBlock on cat[h, skip_k], k = 11 − j: its in_layers norm has ch(h) + ch(skip) channels.
    let schema = Schema.Load(fixture "schema/unet.json")
    let cfg = UNetConfig.Sd21
    let skips = cfg.InputBlockChannels()
    let dec = cfg.DecoderChannelsAtSkip()
    skips |> should equal [| 320; 320; 320; 320; 640; 640; 640; 1280; 1280; 1280; 1280; 1280 |]
    for j in 0..11 do
        let k = 11 - j
        let concat = schema.Shapes.[sprintf "output_blocks.%d.0.in_layers.0.weight" j].[0]
        int concat |> should equal (dec.[k] + skips.[k])

// ---------------------------------------------------------------------------------------------------------------
// Variants 5 (concat features) and 6 (SFT): no official code; see ControlMode's documentation.

[<Theory>]
[<InlineData(ControlMode.Add)>]
[<InlineData(ControlMode.ConcatFeatures)>]
[<InlineData(ControlMode.Sft)>]
let ``at initialisation (copied from the UNet, zero convs) every control mode returns the plain UNet's output`` (mode: ControlMode) =
    use m = loadTiny ControlMode.Add
    // A fresh ControlNet started like the official training: load_controlnet_from_unet — the encoder is the UNet's,
    // the first conv gets zeros for the hint channels, the zero convs (and the variants' convs) stay zero.
    use cn = new ControlNet(m.ControlNet.Config, mode)
    let struct (newZero, scratch) = cn.LoadFromUNet m.Unet
    List.ofSeq newZero |> should equal [ "input_blocks.0.0.weight" ]
    for key in scratch do
        if not (key.StartsWith "zero_convs." || key.StartsWith "middle_block_out." || key.StartsWith "decoder_convs."
                || key.StartsWith "gamma_convs." || key.StartsWith "middle_block_gamma.") then
            failwithf "%s was not initialised from the UNet" key
    cn.AttentionMode <- AttentionMode.Vanilla
    use _ = torch.no_grad ()
    use c = cn.forward(m.X, m.Hint, m.T, m.Context)
    use s = c.Scaled(scales m.Fixture "scale1")
    use e = m.Unet.forward(m.X, m.T, m.Context, s)
    use plain = m.Unet.forward(m.X, m.T, m.Context)
    let d = maxAbs e plain
    log (sprintf "%A at init: max|eps − eps_plain| = %g" mode d)
    d |> should be (lessThanOrEqualTo 1e-7)
    // …and the plain UNet is the official one.
    maxRel plain (m.Fixture.Out "eps_nocontrol") |> should be (lessThan 1e-5)

[<Fact>]
let ``SFT with γ = 0 is IRControlNet: F ⊙ (1 + 0) + β reproduces the official outputs`` () =
    use m = loadTiny ControlMode.Sft
    use _ = torch.no_grad ()
    for s in [ "scale1"; "scale_ramp" ] do
        use e = eps m s
        maxRel e (m.Fixture.Out("eps_" + s)) |> should be (lessThan 1e-5)

[<Fact>]
let ``SFT: gradients reach the γ and β convs at initialisation, and a non-zero γ changes the output`` () =
    use m = loadTiny ControlMode.Sft
    zeroControlOutputs m.ControlNet
    let cn = m.ControlNet
    let loss = (eps m "scale1").square().mean()
    loss.backward ()
    let gradNorm (p: Modules.Parameter) = if isNull p.grad then 0.0 else p.grad.abs().sum().item<float32>() |> float
    let gammaConvs = [ for g in cn.gamma_convs -> g ] @ [ cn.middle_block_gamma ]
    let betaConvs = [ for z in cn.zero_convs -> z ] @ [ cn.middle_block_out ]
    for conv in gammaConvs @ betaConvs do
        for struct (name, p) in conv.named_parameters () do
            let g = gradNorm p
            if g = 0.0 then failwithf "no gradient on %s of a γ/β conv" name
    log (sprintf "Σ|∂L/∂W| γ conv 0: %g, β conv 0: %g"
            (gradNorm (cn.gamma_convs.[0].get_parameter "0.weight")) (gradNorm (cn.zero_convs.[0].get_parameter "0.weight")))
    // One step away from zero, γ modulates the skip features.
    use _ = torch.no_grad ()
    use plain = m.Unet.forward(m.X, m.T, m.Context)
    for p in cn.gamma_convs.[1].parameters () do
        p.add_ (torch.randn_like(p) * 0.1) |> ignore
    use e = eps m "scale1"
    maxAbs e plain |> should be (greaterThan 1e-4)

[<Fact>]
let ``concat features: gradients reach the decoder convs at initialisation, and they change the output`` () =
    use m = loadTiny ControlMode.ConcatFeatures
    zeroControlOutputs m.ControlNet
    let cn = m.ControlNet
    let loss = (eps m "scale1").square().mean()
    loss.backward ()
    for conv in cn.decoder_convs do
        for struct (name, p) in conv.named_parameters () do
            if isNull p.grad || p.grad.abs().sum().item<float32>() = 0.0f then failwithf "no gradient on decoder conv %s" name
    use _ = torch.no_grad ()
    use plain = m.Unet.forward(m.X, m.T, m.Context)
    for p in cn.decoder_convs.[2].parameters () do
        p.add_ (torch.randn_like(p) * 0.1) |> ignore
    use e = eps m "scale1"
    maxAbs e plain |> should be (greaterThan 1e-4)

// ---------------------------------------------------------------------------------------------------------------
// Precision (official ControlLDM.cast_dtype): blocks in half precision, GroupNorm32 / time_embed / out in float32.

let private halfPrecisionError (dtype: torch.ScalarType) =
    use m = loadTiny ControlMode.Add
    // The official default attention with torch ≥ 2 (the vanilla path needs CUDA autocast for half V).
    m.Unet.AttentionMode <- AttentionMode.Sdp
    m.ControlNet.AttentionMode <- AttentionMode.Sdp
    use _ = torch.no_grad ()
    use ref32 = eps m "scale1"
    m.Unet.CastDtype dtype
    m.ControlNet.CastDtype dtype
    // GroupNorm32 stays float32 and the blocks are half: the official layout.
    m.Unet.input_blocks.[1].get_parameter("0.in_layers.0.weight").dtype |> should equal torch.ScalarType.Float32
    m.Unet.input_blocks.[1].get_parameter("0.in_layers.2.weight").dtype |> should equal dtype
    m.Unet.time_embed.get_parameter("0.weight").dtype |> should equal torch.ScalarType.Float32
    m.ControlNet.zero_convs.[0].get_parameter("0.weight").dtype |> should equal dtype
    use c = m.ControlNet.forward(m.X, m.Hint, m.T, m.Context)
    c.Residuals.[0].dtype |> should equal dtype
    use s = c.Scaled(scales m.Fixture "scale1")
    use e = m.Unet.forward(m.X, m.T, m.Context, s)
    e.dtype |> should equal torch.ScalarType.Float32
    let rel = maxRel e ref32
    log (sprintf "%A vs float32 on unet_controlnet (eps_scale1): max_rel=%.3g max_abs=%.3g" dtype rel (maxAbs e ref32))
    rel

[<Fact>]
let ``fp16 (cast_dtype float16) stays within 1e-2 relative of float32`` () =
    halfPrecisionError torch.ScalarType.Float16 |> should be (lessThan 1e-2)

[<Fact>]
let ``bf16 (cast_dtype bfloat16) stays within 5e-2 relative of float32`` () =
    halfPrecisionError torch.ScalarType.BFloat16 |> should be (lessThan 5e-2)

/// Stage 1 (restoration modules, "restore"): BSRNet, SwinIR and SCUNet reproduce the official networks — fixture
/// parity, the released key/shape schemas, the v2.0.0 (paper) weights, and the padding / cropping rules.
module DiffBIR.Lab.Tests.Stage1ModelTests

open System.Collections.Generic
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Checkpoints
open DiffBIR.Lab.Parity
open DiffBIR.Lab.Models.Stage1
open DiffBIR.Lab.Tests.TestSupport

let private maxAbsDiff (a: torch.Tensor) (b: torch.Tensor) = (a - b).abs().max().item<float32>() |> float

/// A model built from a fixture's config with the fixture's weights loaded strictly.
let private loaded (file: string) (build: Fixture -> torch.nn.Module<torch.Tensor, torch.Tensor>) =
    use fx = Fixture.Load(fixture file)
    let m = build fx
    StateDictLoader.Load(m, fx.Weights(), true, file) |> ignore
    m.eval() |> ignore
    m

let private bsrnet () = loaded "bsrnet.safetensors" (fun fx -> new RRDBNet(RRDBNetConfig.FromJson fx.Config))
let private swinir () = loaded "swinir.safetensors" (fun fx -> new SwinIR(SwinIRConfig.FromJson fx.Config))
let private scunet () = loaded "scunet.safetensors" (fun fx -> new SCUNet(SCUNetConfig.FromJson fx.Config))

let private seeded (shape: int64[]) =
    let g = torch.Generator(1234UL)
    torch.rand(shape, generator = g)

// ---- parity with the official code ----

[<Fact>]
let ``BSRNet (RRDBNet x4) matches the official forward`` () =
    let r = assertParity "bsrnet.safetensors"
    r.Outputs.Count |> should equal 1

[<Fact>]
let ``SwinIR (unshuffle x8, nearest+conv) matches the official forward`` () =
    let r = assertParity "swinir.safetensors"
    r.Outputs.Count |> should equal 1

[<Fact>]
let ``SCUNet matches the official forward, with empty stages keeping their down and up convs`` () =
    let r = assertParity "scunet.safetensors"
    r.Outputs.Count |> should equal 1

// ---- the released checkpoints' keys and shapes ----

[<Fact>]
let ``full-size BSRNet has exactly the keys, shapes and 16.7M values of BSRNet.pth`` () =
    assertParity "schema/bsrnet.json" |> ignore

[<Fact>]
let ``full-size SwinIR has exactly the keys, shapes and values of the released SwinIR, buffers included`` () =
    assertParity "schema/swinir.json" |> ignore

[<Fact>]
let ``full-size SCUNet has exactly the keys, shapes and values of scunet_color_real_psnr.pth`` () =
    assertParity "schema/scunet.json" |> ignore

[<Fact>]
let ``the released configs are the yaml files of configs/inference`` () =
    RRDBNetConfig.Full |> should equal (RRDBNetConfig(3, 3, 64, 23, 32, 4))
    SwinIRConfig.Full.EmbedDim |> should equal 180
    SwinIRConfig.Full.Depths |> should equal [| 6; 6; 6; 6; 6; 6; 6; 6 |]
    SwinIRConfig.Full.WindowSize |> should equal 8
    SwinIRConfig.Full.Sf |> should equal 8
    SCUNetConfig.Full.Blocks |> should equal [| 4; 4; 4; 4; 4; 4; 4 |]

// ---- strict loading ----

[<Fact>]
let ``a strict load refuses a wrong-shaped tensor and names its key`` () =
    use fx = Fixture.Load(fixture "bsrnet.safetensors")
    use m = new RRDBNet(RRDBNetConfig.FromJson fx.Config)
    let sd = Dictionary<string, torch.Tensor>(fx.Weights())
    sd.["RRDB_trunk.1.RDB2.conv3.weight"] <- torch.zeros(8L, 31L, 3L, 3L)
    let ex = Assert.Throws<StateDictMismatchException>(fun () -> StateDictLoader.Load(m, sd, true, "bsrnet.safetensors") |> ignore)
    ex.Message |> should haveSubstring "RRDB_trunk.1.RDB2.conv3.weight"
    ex.Report.ShapeMismatches.Count |> should equal 1

[<Fact>]
let ``SwinIR's shifted-window mask is a state_dict key: a checkpoint without it is refused by name`` () =
    use fx = Fixture.Load(fixture "swinir.safetensors")
    use m = new SwinIR(SwinIRConfig.FromJson fx.Config)
    let sd = Dictionary<string, torch.Tensor>(fx.Weights())
    sd.Remove "layers.1.residual_group.blocks.1.attn_mask" |> should be True
    let ex = Assert.Throws<StateDictMismatchException>(fun () -> StateDictLoader.Load(m, sd, true, "swinir.safetensors") |> ignore)
    List.ofSeq ex.Report.Missing |> should equal [ "layers.1.residual_group.blocks.1.attn_mask" ]

[<Fact>]
let ``SwinIR computes the same relative_position_index and attn_mask buffers as the official code`` () =
    use fx = Fixture.Load(fixture "swinir.safetensors")
    use m = new SwinIR(SwinIRConfig.FromJson fx.Config)
    let ours = m.state_dict()
    let buffers = fx.Weights() |> Seq.filter (fun kv -> kv.Key.EndsWith "attn_mask" || kv.Key.EndsWith "relative_position_index") |> List.ofSeq
    buffers.Length |> should equal 6 // 4 blocks' indices, 2 shifted blocks' masks
    for kv in buffers do
        ours.[kv.Key].dtype |> should equal kv.Value.dtype
        (ours.[kv.Key].to_type(torch.float64) - kv.Value.to_type(torch.float64)).abs().max().item<float>() |> should equal 0.0

// ---- the paper version (v2.0.0) ----

[<Fact>]
let ``the v2.0.0 BSRNet and SwinIR weights load strictly, and v2.0.0 BSRNet restores the stage-2 input`` () =
    use fx = Fixture.Load(fixture "v2.0.0/pipeline.safetensors")
    let cfg = fx.Config
    use rrdb = new RRDBNet(RRDBNetConfig.FromJson cfg.["RRDBNet"])
    use swin = new SwinIR(SwinIRConfig.FromJson cfg.["SwinIR"])
    let rb = StateDictLoader.Load(rrdb, fx.Weights "bsrnet", true, "v2.0.0 bsrnet")
    let rs = StateDictLoader.Load(swin, fx.Weights "swinir", true, "v2.0.0 swinir")
    rb.Loaded |> should equal (fx.Weights "bsrnet").Count
    rs.Loaded |> should equal (fx.Weights "swinir").Count
    // out.st2.clean = RRDBNet(lq_uint8 / 255 as NCHW): the paper version's stage 1 on its own.
    rrdb.eval() |> ignore
    use _ = torch.no_grad()
    use lq = fx.In("st2.lq_uint8").to_type(torch.float32).div(torch.tensor 255.0f).permute(0L, 3L, 1L, 2L)
    use clean = rrdb.forward lq
    let expected = fx.Out "st2.clean"
    clean.shape |> should equal expected.shape
    maxAbsDiff clean expected |> should be (lessThanOrEqualTo (1e-5 * (expected.abs().max().item<float32>() |> float)))

// ---- padding and cropping rules ----

[<Fact>]
let ``SwinIR reflect-pads a 60x124 input to the window and returns the padded 64x128 size`` () =
    use m = swinir ()
    use _ = torch.no_grad()
    use x = seeded [| 1L; 3L; 60L; 124L |]
    use y = m.forward x
    y.shape |> should equal [| 1L; 3L; 64L; 128L |]
    // The 8x16 token grid differs from img_size (64x64 tokens): the mask is recomputed, and the result is the
    // network on the explicitly reflect-padded image.
    use padded = torch.nn.functional.pad(x, [| 0L; 4L; 0L; 4L |], PaddingModes.Reflect)
    use y2 = m.forward padded
    maxAbsDiff y y2 |> should equal 0.0

[<Fact>]
let ``SwinIR refuses, as the official code, a padded side that is not a multiple of 8 x window`` () =
    use m = swinir ()
    use _ = torch.no_grad()
    use x = seeded [| 1L; 3L; 72L; 64L |]
    let ex = Assert.Throws<System.ArgumentException>(fun () -> m.forward x |> ignore)
    ex.Message |> should haveSubstring "window size"

[<Fact>]
let ``SwinIR's recomputed mask for a 16x24 token grid separates the same token pairs as SCUNet's SW mask`` () =
    // Two official formulations of one rule: after the cyclic shift, tokens from opposite borders must not attend.
    use swinMask = SwinTransformerBlock.CalculateMask(16L, 24L, 8, 4, null)
    use scuMask = WMSA.GenerateMask(2L, 3L, 8, 4, null)
    swinMask.shape |> should equal [| 6L; 64L; 64L |]
    use a = swinMask.ne(torch.tensor 0.0f)
    use b = scuMask.reshape(6L, 64L, 64L)
    a.equal(b).all().item<bool>() |> should be True
    // Only windows on the bottom row or the right column (2..5 of the 2x3 windows) are masked.
    [ for i in 0L .. 5L -> a.[i].any().item<bool>() ] |> should equal [ false; false; true; true; true; true ]

[<Fact>]
let ``SCUNet replication-pads a 50x70 input to 64x128 and crops the result back to 50x70`` () =
    use m = scunet ()
    use _ = torch.no_grad()
    use x = seeded [| 1L; 3L; 50L; 70L |]
    use y = m.forward x
    y.shape |> should equal [| 1L; 3L; 50L; 70L |]
    use padded = torch.nn.functional.pad(x, [| 0L; 58L; 0L; 14L |], PaddingModes.Replicate)
    use full = m.forward padded
    full.shape |> should equal [| 1L; 3L; 64L; 128L |]
    use cropped = full.slice(2L, 0L, 50L, 1L).slice(3L, 0L, 70L, 1L)
    maxAbsDiff y cropped |> should equal 0.0

[<Fact>]
let ``BSRNet upscales by 4 any input size`` () =
    use m = bsrnet ()
    use _ = torch.no_grad()
    use x = seeded [| 2L; 3L; 7L; 11L |]
    use y = m.forward x
    y.shape |> should equal [| 2L; 3L; 28L; 44L |]

// ---- native memory ----

[<Fact>]
let ``a forward inside a DisposeScope leaves only its result alive`` () =
    use b = bsrnet ()
    use s = swinir ()
    use c = scunet ()
    use x = seeded [| 1L; 3L; 60L; 60L |]
    use _ = torch.no_grad()
    for m in [ b :> torch.nn.Module<torch.Tensor, torch.Tensor>; s; c ] do
        use scope = torch.NewDisposeScope()
        let y = m.forward x
        scope.DisposablesCount |> should equal 1
        scope.Contains y |> should be True

/// ControlLDM: the four networks composed as the official class, checked against recorded calls and the e2e fixture.
module DiffBIR.Lab.Tests.ControlLdmTests

open System.Collections.Generic
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Checkpoints
open DiffBIR.Lab.Diffusion
open DiffBIR.Lab.Models
open DiffBIR.Lab.Models.Clip
open DiffBIR.Lab.Parity
open DiffBIR.Lab.Tests.TestSupport

/// The tiny ControlLDM of the e2e fixture, with its weights (all four modules, strict).
let private e2eModel (fx: Fixture) =
    let cfg = ControlLdmConfig.FromJson(fx.Config.["cldm"])
    let m = new ControlLDM(cfg, ClipTokenizer(fixture "bpe_simple_vocab_16e6.txt.gz"))
    for name in [ "unet"; "vae"; "clip"; "controlnet" ] do
        let w = fx.Weights name
        let target : torch.nn.Module =
            match name with
            | "unet" -> m.unet :> _
            | "vae" -> m.vae :> _
            | "clip" -> m.clip :> _
            | _ -> m.controlnet :> _
        StateDictLoader.Load(target, w, sourceName = name) |> ignore
    m.AttentionMode <- DiffBIR.Lab.Models.StableDiffusion.AttentionMode.Vanilla
    m.eval()
    m

[<Fact>]
let ``ControlLDM.Forward reproduces a recorded model call of the samplers fixture`` () =
    use e2e = Fixture.Load(fixture "e2e_bsr_v2.safetensors")
    use fx = Fixture.Load(fixture "samplers.safetensors")
    // The samplers fixture's UNet/ControlNet have the e2e fixture's tiny config (other weights): load them into it.
    use m = e2eModel e2e
    StateDictLoader.Load(m.unet, fx.Weights "unet") |> ignore
    StateDictLoader.Load(m.controlnet, fx.Weights "controlnet") |> ignore
    // Spaced calls the positive branch, then the negative one (even / odd call numbers).
    let pos = Conditioning(fx.In "cond.c_txt", fx.In "cond.c_img")
    let neg = Conditioning(fx.In "uncond.c_txt", fx.In "uncond.c_img")
    use _ng = torch.no_grad()
    for call, cond in [ "00", pos; "01", neg; "04", pos; "07", neg ] do
        use eps = m.Forward(fx.Out(sprintf "v2.spaced.call.%s.x" call), fx.Out(sprintf "v2.spaced.call.%s.t" call), cond)
        let r = ParityRunner.Compare("out", eps, fx.Out(sprintf "v2.spaced.call.%s.out" call), Tolerance(1e-5, 1e-6))
        Assert.True(r.Pass, sprintf "call %s max_rel %g" call r.MaxRel)

[<Fact>]
let ``prepare_condition and the forward of the e2e ControlLDM match the official values`` () =
    use fx = Fixture.Load(fixture "e2e_bsr_v2.safetensors")
    use m = e2eModel fx
    use _ng = torch.no_grad()
    let stage1 = fx.Out "untiled.stage1"
    use padded = DiffBIR.Lab.Pipeline.ImageOps.PadToMultiplesOf(stage1, 64)
    let pos = fx.MetaJson("run_args").["untiled"].["pos_prompt"].GetValue<string>()
    let cond = m.PrepareCondition(padded, [| pos |])
    let rImg = ParityRunner.Compare("c_img", cond.CImage, fx.Out "untiled.c_img", Tolerance(1e-4, 1e-6))
    Assert.True(rImg.Pass, sprintf "c_img max_rel %g" rImg.MaxRel)
    let rTxt = ParityRunner.Compare("c_txt", cond.CText, fx.Out "untiled.c_txt", Tolerance(1e-5, 1e-6))
    Assert.True(rTxt.Pass, sprintf "c_txt max_rel %g" rTxt.MaxRel)

[<Fact>]
let ``a Stable Diffusion checkpoint loads by prefix; unused and missing keys are reported, as the official loader does`` () =
    use fx = Fixture.Load(fixture "e2e_bsr_v2.safetensors")
    let cfg = ControlLdmConfig.FromJson(fx.Config.["cldm"])
    use m = new ControlLDM(cfg)
    let sd = Dictionary<string, torch.Tensor>()
    for KeyValue(k, v) in fx.Weights "unet" do sd.["model.diffusion_model." + k] <- v
    for KeyValue(k, v) in fx.Weights "vae" do sd.["first_stage_model." + k] <- v
    for KeyValue(k, v) in fx.Weights "clip" do
        if k <> "model.ln_final.bias" then sd.["cond_stage_model." + k] <- v
    sd.["model_ema.decay"] <- torch.tensor 0.999f
    sd.["cond_stage_model.model.visual.proj"] <- torch.zeros(4L)
    let struct (unused, missing) = m.LoadPretrainedSd(sd)
    List.ofSeq missing |> should equal [ "cond_stage_model.model.ln_final.bias" ]
    unused |> should contain "model_ema.decay"
    unused |> should contain "cond_stage_model.model.visual.proj"
    let w = fx.Weights "unet"
    m.unet.state_dict().["out.2.weight"].equal(w.["out.2.weight"]).all().item<bool>() |> should be True

/// Shape-only execution on the `meta` device (issue 14, item 5): a tensor on meta carries shape, dtype and device but
/// no data, and libtorch refuses to combine it with a non-scalar CPU tensor — so running a stage on meta fails exactly
/// where run-time code makes a tensor on the wrong device, without a GPU. What the C++ libtorch 2.10 behind
/// TorchSharp cannot run on meta (measured here: no meta kernels for convolution, group/layer norm, SDPA, where, abs,
/// roll; no .item() or copy to the CPU) keeps the networks, the colour fix and the gradient map off it; the sampling
/// stage (every sampler with CFG, its schedules, noise and step arithmetic) runs there with a shape-only denoiser.
module DiffBIR.Lab.Tests.MetaDeviceTests

open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Diffusion
open DiffBIR.Lab.Sampling
open DiffBIR.Lab.Tests.TestSupport

let private meta = torch.device "meta"

let private log (s: string) =
    match TestContext.Current.TestOutputHelper with
    | null -> printfn "%s" s
    | o -> o.WriteLine s

/// A denoiser that only does shape arithmetic: it mixes x, c_img, the text condition and t the way a network would
/// meet them (t moved to x's device as ControlLDM.Forward does), using only ops with meta kernels.
type private ShapeOnlyDenoiser() =
    /// Network evaluations so far, and the devices of everything they were given.
    member val Calls = 0 with get, set
    member val Devices = System.Collections.Generic.HashSet<string>() with get
    interface IDenoiser with
        member this.Forward(x, t, cond) =
            this.Calls <- this.Calls + 1
            for d in [ x.device; cond.CImage.device; cond.CText.device ] do this.Devices.Add(string d) |> ignore
            use tt = t.``to``(x.device).to_type(x.dtype).reshape(-1L, 1L, 1L, 1L)
            use txt = cond.CText.mean([| 1L; 2L |]).reshape(-1L, 1L, 1L, 1L)
            x * 0.5 + cond.CImage * 0.1 + tt * 0.001 + txt

let private condition (device: torch.Device) (text: float) =
    Conditioning(torch.ones([| 1L; 77L; 8L |], device = device) * text, torch.zeros([| 1L; 4L; 8L; 8L |], device = device))

/// Runs a sampler on meta; returns how many network evaluations it made, the devices they saw, and the error (if any).
let private sampleOnMeta (name: string) =
    use _ = torch.no_grad()
    let model = ShapeOnlyDenoiser()
    let cfg = CfgDenoiser(model, condition meta 0.1, condition meta -0.1)
    use xT = torch.zeros([| 1L; 4L; 8L; 8L |], device = meta)
    use noise = new SeededNoise(7L)
    let error =
        try
            use z = sampleAll name NoiseSchedule.V2 (SamplerOptions(CfgScale = 4.0)) cfg xT 3 noise null null
            if z.device_type <> DeviceType.META || z.shape <> [| 1L; 4L; 8L; 8L |] then Some (sprintf "got %A on %O" z.shape z.device) else None
        with e ->
            // where it stopped: the first frame of ours in the trace
            let frame = e.StackTrace.Split('\n') |> Array.tryFind (fun l -> l.Contains "DiffBIR.Lab.") |> Option.map (fun l -> l.Trim()) |> Option.defaultValue ""
            Some (sprintf "%s (%s)" (e.Message.Split('\n').[0]) frame)
    model.Calls, List.ofSeq model.Devices, error

[<Fact>]
let ``meta refuses a non-scalar CPU tensor, so device mixing fails there`` () =
    use m = torch.zeros([| 2L; 3L |], device = meta)
    use c = torch.ones([| 2L; 3L |])
    (fun () -> (m + c).Dispose()) |> should throw typeof<System.Runtime.InteropServices.ExternalException>
    // …while a CPU scalar is fine on any device (as on CUDA), so scalar constants need no device.
    use s = m + torch.tensor 2.0f
    s.device_type |> should equal DeviceType.META

[<Fact>]
let ``no sampler mixes devices on meta (as far as libtorch runs it)`` () =
    let rows = [ for name in Samplers.Names -> name, sampleOnMeta name ]
    for name, (calls, devices, error) in rows do
        log (sprintf "%-16s %d network calls on %A; %s" name calls devices (defaultArg error "ran to the end").[..400])
    for name, (_, devices, error) in rows do
        // Whatever reached the network was on meta…
        Assert.True(devices |> List.forall ((=) "meta"), sprintf "%s gave the network tensors on %A" name devices)
        // …and whatever stopped the run is an op libtorch has no meta kernel for (or a host read of a shape-only
        // tensor), never a tensor on another device.
        match error with
        | Some e when e.Contains "same device" || e.Contains "devices" -> failwithf "%s mixes devices on meta: %s" name e
        | _ -> ()

[<Fact>]
let ``CFG runs on meta in all three batchings of the official samplers`` () =
    use _ = torch.no_grad()
    let model = ShapeOnlyDenoiser()
    let cfg = CfgDenoiser(model, condition meta 0.1, condition meta -0.1)
    use x = torch.zeros([| 1L; 4L; 8L; 8L |], device = meta)
    use t = torch.tensor([| 500L |])   // samplers keep timesteps on the CPU; the network moves them
    for batching in [ CfgBatching.Separate; CfgBatching.PositiveFirst; CfgBatching.NegativeFirst ] do
        let r = ModelRequest(X = x, T = t, Step = 0, Timestep = 500, CfgScale = 4.0, Batching = batching, ToX0 = id, FromX0 = id)
        use out = cfg.Predict r
        out.device_type |> should equal DeviceType.META
        out.shape |> should equal [| 1L; 4L; 8L; 8L |]
    model.Calls |> should equal 4   // two separate calls, then one batched call each
    List.ofSeq model.Devices |> should equal [ "meta" ]

[<Fact>]
let ``the shape-only denoiser fails on meta when it meets a CPU tensor (the check can fail)`` () =
    // The same loop with a condition left on the CPU: exactly the bug this check exists for.
    use _ = torch.no_grad()
    let cpuCond = Conditioning(torch.zeros([| 1L; 77L; 8L |]), torch.zeros([| 1L; 4L; 8L; 8L |]))
    let cfg = CfgDenoiser(ShapeOnlyDenoiser(), cpuCond, cpuCond)
    use xT = torch.zeros([| 1L; 4L; 8L; 8L |], device = meta)
    use noise = new SeededNoise(7L)
    (fun () -> (sampleAll "spaced" NoiseSchedule.V2 (SamplerOptions(CfgScale = 4.0)) cfg xT 3 noise null null).Dispose())
    |> should throw typeof<System.Runtime.InteropServices.ExternalException>

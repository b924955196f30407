/// Registers the lab's HTML formatters with the .NET Interactive kernel that loaded this assembly (found by reflection,
/// so the assembly does not depend on one kernel version and does nothing outside a kernel).
namespace DiffBIR.Lab.Interactive

open System
open System.IO
open System.Reflection
open Plotly.NET
open TorchSharp

module Formatters =
    let private formatterType () =
        AppDomain.CurrentDomain.GetAssemblies()
        |> Seq.tryPick (fun a ->
            if a.GetName().Name = "Microsoft.DotNet.Interactive.Formatting" then
                Option.ofObj (a.GetType "Microsoft.DotNet.Interactive.Formatting.Formatter")
            else None)

    /// HTML for the values this assembly knows how to show; None for anything else.
    let render (value: obj) : string option =
        match value with
        | :? ImageGrid as g -> Some(Html.grid g)
        | :? torch.Tensor as t ->
            match Html.asImages t with
            | Some batch when batch.shape.[2] >= 8L && batch.shape.[3] >= 8L ->
                let n = int batch.shape.[0]
                Some(Html.grid { Items = [ { Caption = Html.tensorSummary t; Image = t } ]; Columns = min n 6; Width = min 256 (max 96 (int batch.shape.[3])) })
            | _ -> Some(sprintf "<code>%s</code>" (Html.encode (Html.tensorSummary t)))
        | :? GenericChart as c -> Some(Charts.toNotebookHtml c)
        | :? DiffBIR.Lab.Pipeline.RestorationResult as r ->
            Some(Html.grid (Html.row [ "stage 1 (I_RM)", r.Stage1; "restored", r.Image ]))
        | _ -> None

    /// Rows of an F# list, array or sequence of records as a table (a list would otherwise render as a tree of
    /// Head / Tail properties).
    let renderRows (value: obj) = Html.table (value :?> Collections.IEnumerable |> Seq.cast<obj>)

    let mutable private registered = false

    /// Registers formatters for images (tensors, ImageGrid), restoration results, Plotly charts (offline) and F#
    /// lists (tables) as text/html. Returns false outside a .NET Interactive kernel. Idempotent.
    let register () =
        match formatterType () with
        | None -> false
        | Some ft when registered -> ignore ft; true
        | Some ft ->
            // Plotly.NET's 600 × 600 default clips long titles and legends.
            Defaults.DefaultWidth <- Charts.DefaultWidth
            Defaults.DefaultHeight <- Charts.DefaultHeight
            let reg =
                ft.GetMethods(BindingFlags.Public ||| BindingFlags.Static)
                |> Array.find (fun m ->
                    m.Name = "Register" && not m.IsGenericMethodDefinition
                    && (let ps = m.GetParameters()
                        ps.Length = 3 && ps.[0].ParameterType = typeof<Type> && ps.[1].ParameterType = typeof<Action<obj, TextWriter>>))
            let add (t: Type) (f: obj -> string) =
                reg.Invoke(null, [| box t; box (Action<obj, TextWriter>(fun v w -> w.Write(f v))); box "text/html" |]) |> ignore
            let orText (v: obj) = match render v with Some h -> h | None -> Html.encode (string v)
            for t in [ typeof<ImageGrid>; typeof<torch.Tensor>; typeof<GenericChart>; typeof<DiffBIR.Lab.Pipeline.RestorationResult> ] do
                add t orText
            add (typedefof<list<_>>) renderRows
            registered <- true
            true

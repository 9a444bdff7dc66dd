{{/*
Object names are those of config/default (its namePrefix `pequod-`): the operator's defaults
(`pequod rbac --service-account`, the graph-signing key, the leader Lease) expect them, so one
release per cluster.
*/}}

{{- define "pequod.labels" -}}
app.kubernetes.io/name: pequod
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "pequod.selectorLabels" -}}
control-plane: controller-manager
{{- end }}

{{- define "pequod.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The chart's name, or nameOverride. */}}
{{- define "tidepool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name: fullnameOverride, else the release name
when it already holds the chart's name, else "<release>-<chart>".
*/}}
{{- define "tidepool.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := include "tidepool.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Names of the three parts; each is also the name of its ServiceAccount. */}}
{{- define "tidepool.operator" -}}{{ include "tidepool.fullname" . }}-operator{{- end }}
{{- define "tidepool.agent" -}}{{ include "tidepool.fullname" . }}-agent{{- end }}
{{- define "tidepool.session" -}}{{ include "tidepool.fullname" . }}-session{{- end }}

{{/* The Secret holding the API's bearer token. */}}
{{- define "tidepool.apiTokenSecret" -}}
{{- .Values.apiToken.existingSecret | default (printf "%s-api-token" (include "tidepool.fullname" .)) }}
{{- end }}

{{/* The operator's URL inside the cluster, for agents and session pods. */}}
{{- define "tidepool.operatorURL" -}}
http://{{ include "tidepool.operator" . }}.{{ .Release.Namespace }}.svc:{{ int .Values.service.port }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "tidepool.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tidepool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The operator pods' selector. */}}
{{- define "tidepool.operatorSelector" -}}
app.kubernetes.io/name: {{ include "tidepool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* An image reference: (list $ "name"). */}}
{{- define "tidepool.image" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $tag := $root.Values.images.tag | default $root.Chart.AppVersion }}
{{- with $root.Values.images.registry }}{{ trimSuffix "/" . }}/{{ end }}{{ $name }}:{{ $tag }}
{{- end }}

{{/* imagePullSecrets for a ServiceAccount. */}}
{{- define "tidepool.pullSecrets" -}}
{{- with .Values.images.pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The operator's rule for pool keys, cluster-wide or per pool namespace. */}}
{{- define "tidepool.poolKeyRule" -}}
# Each pool's signing key, in a Secret beside the pool: read by name and
# created once. Never listed or watched, so no other Secret is seen in bulk.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create]
{{- end }}
